"""Advantage estimators, policy losses, loss aggregations and KL estimators as pure tensor functions, chosen by
name in config (the names are validated at config load through each registry's `names()`).

Shapes: token tensors are [N, T] with a 0/1 `mask` over response tokens; rewards are [n_groups, group_size].

A policy loss (see `ppo_clip` for the signature) returns a per-token loss; a `LossAgg` turns it into the scalar
to backpropagate. Every aggregation is (a sum over this micro-batch) / `norm`, so micro-batches and ranks
compose: with `norm` = (the aggregation's `normaliser` summed over every micro-batch of the optimizer step on
every rank) / world size, summing the micro-batch losses (no 1/accumulation-steps scaling) and DeepSpeed's
average over ranks give exactly the gradient of the aggregation over the step's whole global batch, in which a
rank's short responses weigh no more than another's long ones. `norm=None` means this batch alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from r1v.core.registry import Registry

if TYPE_CHECKING:  # torch is imported in the functions that call it: validating a config checks the names here
    from torch import Tensor

ADVANTAGES: Registry[Callable[..., Tensor]] = Registry("advantage estimator")
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, Tensor]]]] = Registry("policy loss")
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")


def masked_mean(x: Tensor, mask: Tensor, tokens: float | None = None) -> Tensor:
    """Sum of `x` over the mask divided by `tokens`, by default the number of masked-in entries."""
    if tokens is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum() / max(tokens, 1e-12)


# ---- advantages: rewards [n_groups, G] -> [n_groups, G] ----

@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised: (r - mean_group) / (std_group + eps). A group with equal rewards gets zero advantage."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


@ADVANTAGES.register("dr_grpo")
@ADVANTAGES.register("mean_centred")
def mean_centred_advantages(rewards: Tensor, eps: float = 0.0) -> Tensor:
    """Dr. GRPO: subtract the group mean, no division by the std, which would up-weight groups that are nearly
    all right or all wrong (a difficulty bias). `mean_centred` is the older name."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


# ---- loss aggregation: per-token loss [N, T] -> scalar ----

@dataclass(frozen=True)
class LossAgg:
    """An aggregation: `numerator(per_token, mask)` summed over a micro-batch, divided by `norm`.

    `normaliser(mask)` is the micro-batch's share of the normaliser (response tokens or non-empty sequences): sum it
    over the step's micro-batches and ranks, divide by world size, and pass that as `norm` to every micro-batch.
    """

    name: str
    numerator: Callable[[Tensor, Tensor], Tensor]
    normaliser: Callable[[Tensor], float]

    def __call__(self, per_token: Tensor, mask: Tensor, norm: float | None = None) -> Tensor:
        n = self.normaliser(mask) if norm is None else norm
        return self.numerator(per_token, mask) / max(n, 1e-12)


LOSS_AGG: Registry[LossAgg] = Registry("loss aggregation")


def _tokens(mask: Tensor) -> float:
    return float(mask.sum())


def _sequences(mask: Tensor) -> float:
    """Sequences with at least one response token: an empty completion contributes nothing and counts not."""
    return float((mask.sum(-1) > 0).sum())


def _register_agg(name: str, numerator: Callable[[Tensor, Tensor], Tensor], normaliser: Callable[[Tensor], float]
                  ) -> None:
    LOSS_AGG.register(name)(LossAgg(name, numerator, normaliser))


# every token of the global batch weighs alike (DAPO): long answers are not diluted
_register_agg("token_mean", lambda x, m: (x * m).sum(), _tokens)
# every sequence weighs alike, its tokens share its weight (the original GRPO)
_register_agg("seq_mean_token_mean", lambda x, m: ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).sum(), _sequences)
# every sequence weighs alike, its tokens are summed (Dr. GRPO up to a constant: no length normalisation)
_register_agg("seq_mean_token_sum", lambda x, m: (x * m).sum(), _sequences)


# ---- policy losses: (logp, old_logp, adv, mask, *, clip_eps_low, clip_eps_high, dual_clip_c, weights) ----

@POLICY_LOSSES.register("clipped_surrogate")
@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_eps_low: float = 0.2,
             clip_eps_high: float = 0.2, dual_clip_c: float | None = None, weights: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate per token, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = pi / pi_old.

    clip-higher (DAPO): eps_high > eps_low leaves room to raise unlikely tokens of good answers (exploration).
    dual clip: for A < 0 the loss is capped at c |A| (c > 1), so a token whose ratio exploded cannot dominate.
    `weights` (e.g. `tis_weights`) multiply the per-token loss, detached. `adv` is [N] (broadcast over tokens) or
    [N, T]. Returns the per-token loss [N, T], to aggregate with a `LossAgg`, and per-token 0/1 indicators [N, T]
    (detached; sum them over the mask, then divide by the tokens): clip_low (A < 0, r < 1 - eps_low), clip_high
    (A > 0, r > 1 + eps_high), clip (either; the gradient is zero there), dual_clip (A < 0, r > c).
    `clipped_surrogate` is this function's older registry name (eps_low = eps_high = the config's clip_eps).
    """
    import torch

    if dual_clip_c is not None and dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # a bound on exp only; gradients are clipped far sooner
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * a)
    with torch.no_grad():
        low, high = (a < 0) & (ratio < 1 - clip_eps_low), (a > 0) & (ratio > 1 + clip_eps_high)
        dual = (a < 0) & (ratio > dual_clip_c) if dual_clip_c is not None else torch.zeros_like(low)
        stats = {"clip_low": low.float(), "clip_high": high.float(), "clip": (low | high).float(),
                 "dual_clip": dual.float()}
    if dual_clip_c is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -dual_clip_c * a), loss)
    if weights is not None:
        loss = loss * weights.detach()
    return loss, stats


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip_eps: float = 0.2,
                      tokens: float | None = None) -> tuple[Tensor, Tensor]:
    """The older scalar interface: `ppo_clip` with eps_low = eps_high = clip_eps, token-mean aggregated over
    `tokens` (default: this batch's count). Returns (loss, clip fraction over the same count)."""
    per_token, st = ppo_clip(logp, old_logp, adv, mask, clip_eps_low=clip_eps, clip_eps_high=clip_eps)
    return masked_mean(per_token, mask, tokens), masked_mean(st["clip"], mask, tokens)


# ---- rollout/trainer mismatch ----

def tis_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance sampling: min(pi_old / pi_rollout, cap) per token, detached, 1 outside the mask.

    Why: the rollout engine (vLLM, other kernels or precision) samples from a slightly different distribution than
    the trainer's pi_old; this re-weights its samples towards pi_old, truncated so one rare token cannot blow up.
    """
    import torch

    log_w = (old_logp - rollout_logp).detach().clamp(-20, math.log(cap))
    return torch.where(mask > 0, log_w.exp(), torch.ones_like(log_w))


def logprob_mismatch(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the engine's, over this batch's mask: mean
    and max |diff|, the mean ratio pi_trainer / pi_rollout, and KL(rollout || trainer) by the k1 and k3 estimators
    (the samples come from the rollout engine). Detached 0-d tensors, for logging every step."""
    d = (trainer_logp - rollout_logp).detach().float()
    m = mask > 0
    zero = d.new_zeros(())
    return {"abs_diff_mean": masked_mean(d.abs(), mask),
            "abs_diff_max": d.abs()[m].max() if m.any() else zero,
            "ratio_mean": masked_mean(d.clamp(-20, 20).exp(), mask),
            "kl_k1": masked_mean(-d, mask),
            "kl_k3": masked_mean(kl_k3(rollout_logp.detach().float(), trainer_logp.detach().float()), mask)}


# ---- KL estimators ----

@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's unbiased, non-negative estimator of KL(pi || ref): exp(r) - r - 1 with r = ref - logp."""
    import torch

    r = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(r) - r - 1
