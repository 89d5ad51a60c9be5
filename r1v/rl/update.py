"""The GRPO update without Ray: a `RolloutBatch` in, one policy update (ppo_epochs optimizer steps) out.

Ray Train workers call `grpo_update` after asking their rollout actor for samples; a plain single process (a
`torchrun`-style script, `bench/gpu_step.py`) calls it with completions from an in-process engine. Nothing here
imports Ray. Every tensor the update builds goes to the engine's device through `r1v.train.device`, in the
engine's dtype where it is floating point (the reference projector too), so the same code runs on CPU in fp32
or bf16 and on GPUs under NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from r1v.config import GRPOConfig
from r1v.data.collate import tiles_from_bytes
from r1v.rl.algos import ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, masked_mean, token_logprobs
from r1v.rl.engines import Completion
from r1v.rl.rewards import score
from r1v.train.device import engine_device, engine_dtype, to_device
from r1v.train.engine import all_reduce_sum, gathered


@dataclass
class RolloutBatch:
    """One worker's rollouts of a step: its prompts (preprocessed rows with `input_ids`, `pixel_values`,
    `n_tiles`, `answer`) and, per prompt, its group of completions."""

    prompts: list[dict[str, Any]]
    completions: list[list[Completion]]

    @property
    def flat(self) -> list[Completion]:
        return [cp for g in self.completions for cp in g]

    @property
    def samples(self) -> list[dict[str, Any]]:
        """The prompt row of every completion, in `flat` order."""
        return [p for p, g in zip(self.prompts, self.completions, strict=True) for _ in g]


def build_batch(prompts: list[dict[str, Any]], comps: list[list[Completion]], pad_id: int
                ) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows, in prompt-major order, with a mask over response targets."""
    seqs, resp_start = [], []
    for p, group in zip(prompts, comps, strict=True):
        for comp in group:
            seqs.append(list(p["input_ids"]) + list(comp.token_ids))
            resp_start.append(len(p["input_ids"]))
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros((len(seqs), longest - 1), dtype=torch.float32)  # over shifted targets
    for i, (s, st) in enumerate(zip(seqs, resp_start, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, st - 1 : len(s) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def sequence_logprobs(model, batch: dict[str, torch.Tensor], features: torch.Tensor, temperature: float,
                      projector: torch.nn.Module | None = None) -> torch.Tensor:
    from r1v.model.forward import multimodal_logits

    logits = multimodal_logits(model, batch["input_ids"], batch["attention_mask"], projector=projector,
                               features=features)
    return token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:], temperature)


def reference_projector(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the model's projector as it is now, on `device` in `dtype`: the KL reference (frozen
    backbones + the starting projector). Built from gathered tensors, so it is whole under ZeRO-3 too."""
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    proj = module.model.multi_modal_projector
    ref = InternVLMultiModalProjector(module.config)
    with gathered(list(proj.parameters())), torch.no_grad():
        ref.load_state_dict({k: v.detach().clone().cpu() for k, v in proj.state_dict().items()})
    return ref.to(device=device, dtype=dtype).requires_grad_(False).eval()


def grpo_update(engine, rb: RolloutBatch, c: GRPOConfig, pad_id: int, tile: int, world: int,
                ref_projector: torch.nn.Module | None = None) -> dict[str, Any]:
    """Score `rb`, compute group advantages, then `c.ppo_epochs` clipped-surrogate (+ KL) optimizer steps.

    The policy loss is a token mean over the response tokens of every rank (DeepSpeed averages gradients over
    ranks, hence the count / world). Returns the last epoch's loss, kl, clip fraction, and the per-sample rewards
    (`total`, `per`) for the caller's metrics. All ranks must call it (ZeRO-3 gathers inside forward).
    """
    from r1v.model.forward import vision_features

    module = engine.module
    device, dtype = engine_device(engine), engine_dtype(engine)
    flat, samples = rb.flat, rb.samples
    total, per = score([cp.text for cp in flat], samples, c.rewards)
    rewards = torch.tensor(total, dtype=torch.float32).view(len(rb.prompts), c.group_size)
    adv = to_device(ADVANTAGES.get(c.advantage)(rewards).reshape(-1), device)
    batch = to_device(build_batch(rb.prompts, rb.completions, pad_id), device)
    mask = batch["response_mask"]
    pixels = to_device(torch.from_numpy(np.concatenate([  # uint8: vision_features normalises next to the model
        tiles_from_bytes(p["pixel_values"], p["n_tiles"], tile) for p in rb.prompts])), device)
    with torch.set_grad_enabled("vision" in c.trainable):
        feats = vision_features(module, pixels)
    per_prompt = torch.split(feats, [p["n_tiles"] for p in rb.prompts])
    feats_rep = torch.cat([f for f, g in zip(per_prompt, rb.completions, strict=True) for _ in g])
    temp = c.sampling.temperature if c.sampling.temperature > 0 else 1.0
    loss_fn, kl_fn = POLICY_LOSSES.get(c.policy_loss), KL_ESTIMATORS.get(c.kl_estimator)
    use_kl = c.kl_coef > 0
    if use_kl and ref_projector is None:
        raise ValueError("kl_coef > 0 needs the reference projector (see reference_projector)")
    with torch.no_grad():
        old = sequence_logprobs(module, batch, feats_rep, temp)
        ref = sequence_logprobs(module, batch, feats_rep.to(dtype), temp, ref_projector) if use_kl else None
    tokens = all_reduce_sum([float(mask.sum())])[0] / world
    stats: dict[str, Any] = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
    for _ in range(c.ppo_epochs):
        logp = sequence_logprobs(module, batch, feats_rep, temp)
        pg, clip_frac = loss_fn(logp, old, adv, mask, c.clip_eps, tokens=tokens)
        kl = masked_mean(kl_fn(logp, ref), mask, tokens) if ref is not None else torch.zeros((), device=device)
        loss = pg + c.kl_coef * kl
        engine.backward(loss)
        engine.step()
        stats = {"loss": float(loss.detach()), "kl": float(kl.detach()), "clip_frac": float(clip_frac)}
    return {**stats, "total": total, "per": per}
