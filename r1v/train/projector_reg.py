"""Regularising the projector's outputs toward the scale of the LLM's token embeddings (`projector_norm_reg`).

Why: an MLP projector aligned through a frozen LLM's loss is free to emit vectors far larger than any token
embedding (about 28x the mean token-embedding norm in the miniature world), inputs the LLM never saw in
pretraining. The instruct LLM it is aligned on may learn to read them; whether another LLM of the same embedding
space does, after re-assembly, is the question. The penalty (||f|| / r - 1)^2, averaged over the image tokens of
a micro-batch with r the mean norm of the LLM's input embeddings, pulls the features back to the scale the LLM
knows without fixing their direction. A compared option for the alignment (docs/world.md), off by default.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def embedding_norm(model: torch.nn.Module) -> float:
    """Mean L2 norm of the LLM's input-embedding rows. Under ZeRO-3 the table is gathered for the read, so every
    rank must call this (it is a collective there)."""
    weight = model.get_input_embeddings().weight
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
    with gather, torch.no_grad():
        return float(weight.detach().float().norm(dim=-1).mean())


class ProjectorNormPenalty:
    """Captures the projector's outputs of each forward (a forward hook) and turns them into the penalty.

    `take()` returns the mean of (||f|| / r - 1)^2 over every image token captured since the last call (a 0-d
    tensor with the graph to the projector), or None if no image went through; `last_ratio` is the mean ||f|| / r
    of that batch, for logging.
    """

    def __init__(self, model: torch.nn.Module, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        self.weight = weight
        self.reference_norm = embedding_norm(model)
        if self.reference_norm <= 0:
            raise ValueError(f"the token embeddings have norm {self.reference_norm}: nothing to regularise toward")
        self.last_ratio = float("nan")
        self._captured: list[Tensor] = []
        self._handle = model.model.multi_modal_projector.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        self._captured.append(output)

    def take(self) -> Tensor | None:
        captured, self._captured = self._captured, []
        if not captured:
            return None
        feats = torch.cat([o.reshape(-1, o.shape[-1]) for o in captured]).float()
        ratio = feats.norm(dim=-1) / self.reference_norm
        self.last_ratio = float(ratio.detach().mean())
        return ((ratio - 1.0) ** 2).mean()

    def remove(self) -> None:
        self._handle.remove()
