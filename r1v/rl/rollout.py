"""The rollout phase of a GRPO step: ask the engine, score, and optionally refill (DAPO's dynamic sampling) and
replay (R1V2's Selective Sample Buffer). No Ray here: the engine call is a function the caller passes.

Every rank ends the phase with exactly `prompts_per_step * group_size` samples, whatever was dropped or
replayed, because ZeRO-3 needs every rank to run the same number of forwards in the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from r1v.generation.engines import Completion
from r1v.rl.config import GRPOConfig
from r1v.rl.sampling import SelectiveSampleBuffer, informative_groups
from r1v.rl.update import RolloutBatch, score_phase

Generate = Callable[[list[dict[str, Any]], int], list[list[Completion]]]  # (prompts, round) -> groups


def take_groups(picks: list[tuple[RolloutBatch, int, float]]) -> RolloutBatch:
    """A batch of the chosen groups `(batch, group index, loss weight)`, with their rewards and advantages."""
    prompts, comps, rewards, adv, weight = [], [], [], [], []
    names = sorted({k for rb, _, _ in picks for k in rb.reward_parts})
    parts: dict[str, list[float]] = {k: [] for k in names}
    for rb, g, w in picks:
        start = sum(rb.group_sizes[:g])
        end = start + rb.group_sizes[g]
        prompts.append(rb.prompts[g])
        comps.append(rb.completions[g])
        rewards += rb.rewards[start:end]
        adv.append(rb.advantages[start:end])
        weight += [w] * (end - start)
        for k in names:
            parts[k] += rb.reward_parts[k][start:end]
    out = RolloutBatch(prompts, comps, rewards, parts, advantages=torch.cat(adv) if adv else torch.zeros(0),
                       loss_weight=torch.tensor(weight, dtype=torch.float32))
    for rb in {id(rb): rb for rb, _, _ in picks}.values():
        for k, v in rb.reward_failures.items():
            out.reward_failures[k] = out.reward_failures.get(k, 0) + v
        for k, msg in rb.reward_errors.items():
            out.reward_errors.setdefault(k, msg)
        for k, v in rb.timings.items():
            out.timings[k] = out.timings.get(k, 0.0) + v
    return out


def collect(generate: Generate, prompts_for_round: Callable[[int], list[dict[str, Any]]], c: GRPOConfig
            ) -> tuple[RolloutBatch, dict[str, float], list[RolloutBatch]]:
    """Roll out and score; with dynamic sampling, keep only groups whose rewards differ and roll out more
    prompts (at most `max_rounds` rounds) until `prompts_per_step` groups are kept; a batch still short is
    topped up with dropped groups at loss weight 0. Returns the batch, counts, and every round's batch (all
    the samples generated: what reward metrics should be computed on)."""
    import time

    rounds: list[RolloutBatch] = []
    kept: list[tuple[RolloutBatch, int, float]] = []
    dropped: list[tuple[RolloutBatch, int, float]] = []
    max_rounds = c.dynamic_sampling.max_rounds if c.dynamic_sampling.enabled else 1
    for r in range(max_rounds):
        t0 = time.perf_counter()
        ps = prompts_for_round(r)
        rb = RolloutBatch(ps, generate(ps, r))
        rb.timings["rollout"] = time.perf_counter() - t0
        score_phase(rb, c)
        rounds.append(rb)
        if not c.dynamic_sampling.enabled:
            return rb, {"rollout_rounds": 1.0, "groups_dropped": 0.0, "groups_filler": 0.0}, rounds
        keep = informative_groups(torch.tensor(rb.rewards).view(len(ps), c.group_size))
        for g in range(len(ps)):
            (kept if bool(keep[g]) else dropped).append((rb, g, 1.0))
        if len(kept) >= c.prompts_per_step:
            break
    need = c.prompts_per_step
    filler = [(rb, g, 0.0) for rb, g, _ in dropped[: max(0, need - len(kept))]]
    batch = take_groups(kept[:need] + filler)
    for key in ("rollout", "reward"):  # every round's time, picked from or not
        batch.timings[key] = sum(rb.timings.get(key, 0.0) for rb in rounds)
    stats = {"rollout_rounds": float(len(rounds)), "groups_dropped": float(len(dropped)),
             "groups_filler": float(len(filler))}
    return batch, stats, rounds


def replay(rb: RolloutBatch, buffer: SelectiveSampleBuffer, c: GRPOConfig, prompts: list[dict[str, Any]],
           rng: np.random.Generator) -> tuple[RolloutBatch, int]:
    """Put buffered samples in the place of `rb`'s zero-advantage groups (whole groups, at most `max_fraction`
    of the samples), then store `rb`'s non-zero-advantage samples for later steps. A prompt row's `_index` is
    its place in `prompts` (the rank's prompt list): the buffer keeps indices, not rows, so it fits in a JSON
    checkpoint.
    Returns the new batch and how many samples were replayed."""
    n = len(rb.rewards)
    budget = int(c.replay.max_fraction * n)
    picks: list[tuple[RolloutBatch, int, float]] = []
    free = 0
    for g, size in enumerate(rb.group_sizes):
        start = sum(rb.group_sizes[:g])
        zero = bool((rb.advantages[start : start + size] == 0).all())
        if zero and free + size <= budget and len(buffer) >= free + size:
            free += size
        else:
            picks.append((rb, g, float(rb.loss_weight[start])))
    drawn = buffer.sample(free, rng) if free else []
    k = 0  # store this step's samples after drawing, so a step never replays its own
    for i, group in enumerate(rb.completions):
        for cp in group:
            a = float(rb.advantages[k])
            if a != 0.0 and float(rb.loss_weight[k]) > 0:
                buffer.add({"prompt": rb.prompts[i]["_index"], "token_ids": cp.token_ids, "text": cp.text,
                            "finished": cp.finished}, a)
            k += 1
    if free == 0:
        return rb, 0
    out = take_groups(picks)
    prompts_out, comps_out, adv_out = list(out.prompts), list(out.completions), [out.advantages]
    for item, a in drawn:
        prompts_out.append(prompts[item["prompt"]])
        # no engine log-probs: the policy that sampled it is gone (no mismatch stats or importance weights)
        comps_out.append([Completion(list(item["token_ids"]), [], item["text"], bool(item["finished"]))])
        adv_out.append(torch.tensor([a], dtype=torch.float32))
    res = RolloutBatch(prompts_out, comps_out, out.rewards + [float("nan")] * free,
                       {k: v + [float("nan")] * free for k, v in out.reward_parts.items()},
                       dict(out.reward_failures), torch.cat(adv_out),
                       torch.cat([out.loss_weight, torch.ones(free)]), dict(rb.timings))
    return res, free
