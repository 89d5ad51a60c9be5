"""Token log-probabilities of rollouts under the trainer's model, without a [N, T, V] tensor of the batch.

A GRPO batch is mostly prompt (hundreds of image tokens per tile) and the loss needs log-probs of the response
tokens only, so `response_logprobs` runs the LLM to its last hidden states, keeps the rows at response
positions, and sends those through `lm_head` in chunks of `chunk` tokens, taking each chunk's log-softmax in
fp32. Peak logits memory is chunk x vocab instead of batch x length x vocab.

Under ZeRO-3 every forward of a submodule is a collective (it gathers the weights), so every rank must make the
same number of `lm_head` calls: the chunk count is all-reduced to the ranks' maximum and a rank with fewer
response tokens runs empty chunks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from r1v.generation.engines import Completion
from r1v.train.engine import all_reduce_max, gathered


def build_batch(prompts: list[dict[str, Any]], comps: list[list[Completion]], pad_id: int
                ) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows, in prompt-major order, with a mask over response targets and the
    rollout engine's log-probs of those targets (0 where the engine returned none; `rollout_valid[i]` says
    whether row i has them: replayed samples do not, their rollout policy is gone).

    Targets are the shifted ids (`input_ids[:, 1:]`): `response_mask[i, t]` is 1 when token t+1 of row i is a
    response token.
    """
    seqs, resp_start, engine_lp = [], [], []
    for p, group in zip(prompts, comps, strict=True):
        for comp in group:
            seqs.append(list(p["input_ids"]) + list(comp.token_ids))
            resp_start.append(len(p["input_ids"]))
            engine_lp.append(comp.logprobs)
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros((len(seqs), longest - 1), dtype=torch.float32)
    rollout = torch.zeros((len(seqs), longest - 1), dtype=torch.float32)
    valid = torch.tensor([float(bool(lp)) for lp in engine_lp])
    for i, (s, st, lp) in enumerate(zip(seqs, resp_start, engine_lp, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, st - 1 : len(s) - 1] = 1.0
        if lp:
            rollout[i, st - 1 : st - 1 + len(lp)] = torch.tensor(lp[: len(s) - st], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "rollout_logp": rollout,
            "rollout_valid": valid}


def response_logprobs(model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, features: Tensor,
                      temperature: float = 1.0, projector: torch.nn.Module | None = None, chunk: int = 4096
                      ) -> Tensor:
    """log p(target) at the response positions of `response_mask` [N, T-1] (0 elsewhere), fp32, differentiable
    through the projector (and whatever else trains).

    `features` are the vision features of the rows' tiles, concatenated in row order (`vision_features`).
    """
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from r1v.model.forward import multimodal_hidden

    hidden = multimodal_hidden(model, input_ids, attention_mask, projector=projector, features=features)
    sel = response_mask.bool()
    h = hidden[:, :-1][sel]  # [M, H]: only the rows that predict a response token
    targets = input_ids[:, 1:][sel]
    n_chunks = all_reduce_max(math.ceil(h.shape[0] / chunk))
    parts = []
    for k in range(max(n_chunks, 1)):
        logits = model.lm_head(h[k * chunk : (k + 1) * chunk]).float()
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        parts.append(-torch.nn.functional.cross_entropy(logits, targets[k * chunk : (k + 1) * chunk],
                                                        reduction="none"))
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(sel, torch.cat(parts))


def sequence_logprobs(model, batch: dict[str, torch.Tensor], features: torch.Tensor, temperature: float,
                      projector: torch.nn.Module | None = None, chunk: int = 4096) -> Tensor:
    """`response_logprobs` of a `build_batch` batch."""
    return response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], features,
                             temperature, projector, chunk)


def reference_projector(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the model's projector as it is now, on `device` in `dtype`: the KL reference (frozen
    backbones + the starting projector). Built from gathered tensors, so it is whole under ZeRO-3 too."""
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    proj = module.model.multi_modal_projector
    ref = InternVLMultiModalProjector(module.config)
    with gathered(list(proj.parameters())), torch.no_grad():
        ref.load_state_dict({k: v.detach().clone().cpu() for k, v in proj.state_dict().items()})
    return ref.to(device=device, dtype=dtype).requires_grad_(False).eval()
