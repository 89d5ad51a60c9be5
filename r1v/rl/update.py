"""The GRPO update without Ray: a `RolloutBatch` passes through named phases, each a plain function.

    score     rewards per completion, advantages per group (`ADVANTAGES`)
    prepare   the batch tensors on the engine's device; vision features once per prompt (frozen tower)
    logprobs  old log-probs (where the update cannot reuse its own pass), reference log-probs (KL), the
              rollout engine's log-probs against the trainer's (mismatch, truncated importance weights)
    update    `ppo_epochs` passes over PPO mini-batches; each mini-batch is one optimizer step over micro-batches
              with gradient accumulation, the loss normalised by the *global* count (`LOSS_AGG`) of the
              mini-batch: response tokens (or sequences) summed over its micro-batches and all ranks

(rollout and sync, the phases that talk to engines, live in `r1v.rl.grpo`.) Ray Train workers call
`grpo_update`; a single process (`bench/gpu_step.py`, `bench/grpo_step.py`) calls it with completions from an
in-process engine. Every tensor goes to the engine's device through `r1v.train.device`, floating point in the
engine's dtype, so the same code runs on CPU in fp32 or bf16 and on GPUs under NCCL.

Batch sizes, per rank: the rollout batch is `prompts_per_step * group_size` samples; `ppo_mini_batch` samples
make one optimizer step; `micro_batch` samples one forward. All ranks hold the same counts (ZeRO-3 gathers
inside every forward, so ranks must run the same number of them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from r1v.data.collate import tiles_from_bytes
from r1v.generation.engines import Completion
from r1v.grading.rewards import score_safe
from r1v.rl import algos
from r1v.rl.config import GRPOConfig
from r1v.rl.logprobs import build_batch, reference_projector, response_logprobs, sequence_logprobs
from r1v.train.device import engine_device, engine_dtype, to_device
from r1v.train.engine import StepOutcome, all_reduce_sum, guarded_step

__all__ = ["RolloutBatch", "build_batch", "grpo_update", "reference_projector", "sequence_logprobs"]


@dataclass
class RolloutBatch:
    """One rank's rollouts of a step and what the phases add to them.

    `prompts` are preprocessed rows (`input_ids`, `pixel_values`, `n_tiles`, `answer`); `completions[i]` is
    prompt i's group. Per-sample fields are in `flat` order (prompt-major).
    """

    prompts: list[dict[str, Any]]
    completions: list[list[Completion]]
    rewards: list[float] | None = None
    reward_parts: dict[str, list[float]] = field(default_factory=dict)
    reward_failures: dict[str, int] = field(default_factory=dict)
    advantages: Tensor | None = None  # [n_samples]
    loss_weight: Tensor | None = None  # [n_samples]: 0 keeps a sample out of the loss and its normaliser
    timings: dict[str, float] = field(default_factory=dict)
    reward_errors: dict[str, str] = field(default_factory=dict)  # reward -> its first failure's message

    @property
    def flat(self) -> list[Completion]:
        return [cp for g in self.completions for cp in g]

    @property
    def samples(self) -> list[dict[str, Any]]:
        """The prompt row of every completion, in `flat` order."""
        return [p for p, g in zip(self.prompts, self.completions, strict=True) for _ in g]

    @property
    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.completions]


@dataclass
class Prepared:
    """The batch as tensors on the engine's device, plus per-sample vision inputs."""

    batch: dict[str, Tensor]
    prompt_of: list[int]  # sample -> prompt index
    features: list[Tensor] | None  # per prompt, when the tower is frozen (computed once)
    pixels: list[Tensor] | None  # per prompt uint8 tiles, when the tower trains (features need a graph)
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    tis: Tensor | None = None


def _timed(rb: RolloutBatch, name: str):
    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            rb.timings[name] = rb.timings.get(name, 0.0) + time.perf_counter() - self.t0

    return _T()


def score_phase(rb: RolloutBatch, c: GRPOConfig) -> RolloutBatch:
    """Rewards (a reward that raises or overruns scores 0 and is counted, never kills the step: the GRPO loop
    bounds the share of failures, `r1v.rl.grpo.check_reward_failures`) and group advantages."""
    with _timed(rb, "reward"):
        rb.rewards, rb.reward_parts, rb.reward_failures = score_safe([cp.text for cp in rb.flat], rb.samples,
                                                                     c.rewards, errors=rb.reward_errors)
        adv_fn = algos.ADVANTAGES.get(c.advantage)
        out, k = [], 0
        for g in rb.group_sizes:  # groups may differ in size (replayed samples come alone)
            out.append(adv_fn(torch.tensor(rb.rewards[k : k + g], dtype=torch.float32).view(1, g)).view(-1))
            k += g
        if rb.advantages is None:
            rb.advantages = torch.cat(out)
        if rb.loss_weight is None:
            rb.loss_weight = torch.ones(len(rb.rewards))
    return rb


def prepare_phase(engine, rb: RolloutBatch, c: GRPOConfig, pad_id: int, tile: int) -> Prepared:
    """Tensors on the engine's device; with a frozen tower, one vision pass per prompt for the whole update."""
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from r1v.model.forward import vision_features

    device = engine_device(engine)
    batch = to_device(build_batch(rb.prompts, rb.completions, pad_id), device)
    pixels = to_device([torch.from_numpy(tiles_from_bytes(p["pixel_values"], p["n_tiles"], tile).copy())
                        for p in rb.prompts], device)
    prompt_of = [i for i, g in enumerate(rb.group_sizes) for _ in range(g)]
    if "vision" in c.trainable:
        return Prepared(batch, prompt_of, None, pixels)
    with _timed(rb, "vision"), torch.no_grad():
        feats = vision_features(engine.module, torch.cat(pixels))
    return Prepared(batch, prompt_of, list(torch.split(feats, [p["n_tiles"] for p in rb.prompts])), None)


def _micro(prep: Prepared, rows: list[int], engine) -> tuple[dict[str, Tensor], Tensor]:
    """The rows' tensors cut to their own longest sequence, and their vision features."""
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from r1v.model.forward import vision_features

    b = prep.batch
    idx = torch.tensor(rows, device=b["input_ids"].device)
    length = int(b["attention_mask"][idx].sum(dim=1).max())
    mb = {"input_ids": b["input_ids"][idx, :length], "attention_mask": b["attention_mask"][idx, :length],
          "response_mask": b["response_mask"][idx, : length - 1],
          "rollout_logp": b["rollout_logp"][idx, : length - 1], "rollout_valid": b["rollout_valid"][idx]}
    if prep.features is not None:
        feats = torch.cat([prep.features[prep.prompt_of[r]] for r in rows])
    else:  # the tower trains: a fresh graph per forward
        feats = vision_features(engine.module, torch.cat([prep.pixels[prep.prompt_of[r]] for r in rows]))
    return mb, feats


def _chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def logprob_phase(engine, rb: RolloutBatch, prep: Prepared, c: GRPOConfig,
                  ref_projector: torch.nn.Module | None) -> None:
    """Old log-probs for the samples whose first update is not in the first mini-batch (that one reuses its own
    forward: the policy has not moved yet), and reference log-probs when the KL is on."""
    n = len(prep.prompt_of)
    mini, micro = c.batch_sizes(n)
    reuse = set(range(min(mini, n)))
    need_old = [r for r in range(n) if r not in reuse]
    T = prep.batch["response_mask"].shape[1]
    device = prep.batch["input_ids"].device
    temp = c.sampling.temperature if c.sampling.temperature > 0 else 1.0
    if c.kl_coef > 0 and ref_projector is None:
        raise ValueError("kl_coef > 0 needs the reference projector (see reference_projector)")
    prep.old_logp = torch.zeros((n, T), dtype=torch.float32, device=device)
    prep.ref_logp = torch.zeros((n, T), dtype=torch.float32, device=device) if c.kl_coef > 0 else None
    with _timed(rb, "logprobs"), torch.no_grad():
        for rows in _chunks(need_old, micro):
            mb, feats = _micro(prep, rows, engine)
            lp = response_logprobs(engine.module, mb["input_ids"], mb["attention_mask"], mb["response_mask"],
                                   feats, temp, chunk=c.logprob_chunk)
            prep.old_logp[rows, : lp.shape[1]] = lp
        if prep.ref_logp is not None:
            for rows in _chunks(list(range(n)), micro):
                mb, feats = _micro(prep, rows, engine)
                lp = response_logprobs(engine.module, mb["input_ids"], mb["attention_mask"], mb["response_mask"],
                                       feats.to(engine_dtype(engine)), temp, ref_projector, chunk=c.logprob_chunk)
                prep.ref_logp[rows, : lp.shape[1]] = lp


def update_phase(engine, rb: RolloutBatch, prep: Prepared, c: GRPOConfig, world: int) -> dict[str, float]:
    """`ppo_epochs` x mini-batches optimizer steps; sums of per-micro-batch stats (see `grpo_update`). A
    mini-batch whose loss or gradient norm is not finite on some rank is skipped by every rank (`guarded_step`)
    and listed in `nonfinite` as (where, outcome); the caller decides whether the stage goes on."""
    n = len(prep.prompt_of)
    mini, micro = c.batch_sizes(n)
    device = prep.batch["input_ids"].device
    adv = to_device(rb.advantages, device)
    weight = to_device(rb.loss_weight, device)
    agg = algos.LOSS_AGG.get(c.loss_agg)
    loss_fn, kl_fn = algos.POLICY_LOSSES.get(c.policy_loss), algos.KL_ESTIMATORS.get(c.kl_estimator)
    temp = c.sampling.temperature if c.sampling.temperature > 0 else 1.0
    stats: dict[str, float] = {"loss": 0.0, "kl": 0.0, "optimizer_steps": 0.0, "mismatch_abs_sum": 0.0,
                               "mismatch_tokens": 0.0}
    token_stats: dict[str, float] = {}
    norms: list[float] = []
    nonfinite: list[tuple[str, StepOutcome]] = []
    with _timed(rb, "update"):
        for epoch in range(c.ppo_epochs):
            for m, mrows in enumerate(_chunks(list(range(n)), mini)):
                micro_rows = _chunks(mrows, micro)
                masks = [prep.batch["response_mask"][r] * weight[r].unsqueeze(-1) for r in micro_rows]
                (norm,) = all_reduce_sum([float(sum(agg.normaliser(mk) for mk in masks))])
                norm /= world  # DeepSpeed averages the ranks' gradients: see r1v.rl.algos
                mini_loss = 0.0
                for i, rows in enumerate(micro_rows):
                    engine.set_gradient_accumulation_boundary(i == len(micro_rows) - 1)
                    mb, feats = _micro(prep, rows, engine)
                    L = mb["response_mask"].shape[1]
                    mask = mb["response_mask"] * weight[rows].unsqueeze(-1)
                    logp = response_logprobs(engine.module, mb["input_ids"], mb["attention_mask"],
                                             mb["response_mask"], feats, temp, chunk=c.logprob_chunk)
                    first = epoch == 0 and m == 0
                    if first:  # the policy has not moved: this pass is the old policy's, kept for later epochs
                        prep.old_logp[rows, :L] = logp.detach()
                    old = prep.old_logp[rows, :L]
                    tis = None
                    seen = mb["response_mask"] * mb["rollout_valid"].unsqueeze(-1)  # rows with engine log-probs
                    if epoch == 0:  # `old` is still the trainer's log-prob under the rollout policy
                        stats["mismatch_abs_sum"] += float(((old - mb["rollout_logp"]).abs() * seen).sum())
                        stats["mismatch_tokens"] += float(seen.sum())
                    if c.tis_cap is not None:  # weight 1 where the engine gave no log-probs
                        tis = algos.tis_weights(old, mb["rollout_logp"], seen, c.tis_cap)
                    per_token, st = loss_fn(logp, old, adv[rows], mask, clip_eps_low=c.clip_eps_low,
                                            clip_eps_high=c.clip_eps_high, dual_clip_c=c.dual_clip_c, weights=tis)
                    loss = agg(per_token, mask, norm)
                    kl = torch.zeros((), device=device)
                    if prep.ref_logp is not None:
                        kl = agg(kl_fn(logp, prep.ref_logp[rows, :L]), mask, norm)
                        loss = loss + c.kl_coef * kl
                    engine.backward(loss, scale_wrt_gas=False)
                    mini_loss += float(loss.detach())
                    stats["loss"] += float(loss.detach()) / c.ppo_epochs
                    stats["kl"] += float(kl.detach()) / c.ppo_epochs
                    for k, v in st.items():  # per-token stats, summed: the caller divides by the tokens
                        token_stats[k] = token_stats.get(k, 0.0) + float((v * mask).sum()) / c.ppo_epochs
                out = guarded_step(engine, mini_loss)
                if out.skipped:
                    nonfinite.append((f"PPO epoch {epoch}, mini-batch {m}", out))
                else:
                    stats["optimizer_steps"] += 1
                    norms.append(out.grad_norm)
    stats["loss_tokens"] = float((prep.batch["response_mask"] * weight.unsqueeze(-1)).sum())
    stats["grad_norm"] = sum(norms) / len(norms) if norms else 0.0
    return {**stats, "token_stats": token_stats, "nonfinite": nonfinite}


def grpo_update(engine, rb: RolloutBatch, c: GRPOConfig, pad_id: int, tile: int, world: int,
                ref_projector: torch.nn.Module | None = None) -> dict[str, Any]:
    """score -> prepare -> logprobs -> update on one rank's `rb`; all ranks must call it (ZeRO-3 gathers inside
    forward). Returns this rank's stats: `loss` and `kl` as this rank's share of the global means (their sum
    over ranks divided by world is the global value), per-token sums of the policy loss's stats with
    `loss_tokens`, the rollout/trainer log-prob mismatch sums, the mean `grad_norm` of the steps taken and the
    skipped ones (`nonfinite`), `total`/`per` rewards, `failures`, `timings`."""
    if rb.rewards is None:
        score_phase(rb, c)
    prep = prepare_phase(engine, rb, c, pad_id, tile)
    logprob_phase(engine, rb, prep, c, ref_projector)
    stats = update_phase(engine, rb, prep, c, world)
    return {**stats, "total": rb.rewards, "per": rb.reward_parts, "failures": rb.reward_failures,
            "timings": dict(rb.timings)}

