"""Advantage estimators, policy losses and KL estimators as pure tensor functions, chosen by name in config.

Shapes: token tensors are [N, T] with a 0/1 `mask` over response tokens; rewards are [n_groups, group_size].

Token means take an optional `tokens`, the count to divide the masked sum by (default: this batch's `mask.sum()`).
Data-parallel training passes (response tokens on all ranks) / world size: DeepSpeed then averages the ranks'
gradients into the gradient of the global token mean, in which a rank's short responses weigh no more than
another's long ones. A registered policy loss must accept `tokens` as a keyword.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from r1v.registry import Registry

ADVANTAGES: Registry[Callable[..., Tensor]] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, Tensor]]] = Registry("policy loss")
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")


def masked_mean(x: Tensor, mask: Tensor, tokens: float | None = None) -> Tensor:
    """Sum of `x` over the mask divided by `tokens`, by default the number of masked-in entries."""
    if tokens is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum() / max(tokens, 1e-12)


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised: (r - mean_group) / (std_group + eps). A group with equal rewards gets zero advantage."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


@ADVANTAGES.register("mean_centred")
def mean_centred_advantages(rewards: Tensor, eps: float = 0.0) -> Tensor:
    """Dr. GRPO's variant: subtract the group mean, do not divide by the std (no difficulty re-weighting)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


@POLICY_LOSSES.register("clipped_surrogate")
def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip_eps: float = 0.2,
                      tokens: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective per token, summed over response tokens and divided by `tokens` (default: their
    number, a token mean). Returns (loss, clip fraction), both over that count.

    `adv` is one value per sequence [N] and is broadcast over its tokens.
    """
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask, tokens)
    clip_frac = masked_mean((clipped < unclipped).float(), mask, tokens)
    return loss, clip_frac.detach()


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's unbiased, non-negative estimator of KL(pi || ref): exp(r) - r - 1 with r = ref - logp."""
    r = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(r) - r - 1


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(targets) under logits/temperature; logits [N, T, V] already aligned with targets [N, T]."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
