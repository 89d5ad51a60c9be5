"""GRPO with rule-based rewards: rollout actors generate, Ray Train workers under DeepSpeed update.

One step, on every worker (each owns a slice of the prompts, all G samples of a prompt stay on one worker),
in named phases (the shape of EasyR1's trainer):
  rollout   its engine actor returns G samples per prompt (`r1v.rl.rollout.collect`, which also scores them
            and, with DAPO's dynamic sampling, drops zero-signal groups and rolls out more); ranks ask their own
            engines at the same time (one engine actor per rank is the fast layout)
  replay    optional: R1V2's Selective Sample Buffer puts earlier non-zero-advantage samples in the place of
            zero-advantage groups
  prepare, logprobs, update   `r1v.rl.update.grpo_update`, without Ray: vision features once per prompt;
            PPO mini-batches of micro-batches, the loss normalised over all ranks and micro-batches
  sync      the trainable tensors, gathered, go from rank 0 to every engine
then the step's metrics, all-reduced by name.

Prompts are taken in passes over the worker's slice, each pass in a permutation seeded by (seed, pass, rank):
the prompts of a step are a function of the step number alone, so a run resumed at step k takes the same
prompts as one that never stopped.

An engine actor that dies is restarted by Ray (`engine.max_restarts`) with the base model: the step's ranks agree
that one was lost (a collective after the rollout, and after each weight push), wait for it, push the current
weights to it again and re-run the lost rollouts with the same seeds, so the step's result is the one it would
have had. Every engine call has a deadline (`engine.call_timeout_s`): a hung engine fails the stage naming it.
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1v.core import storage
from r1v.data.schema import question
from r1v.generation.engines import EngineGoneError, EngineHost, EngineLostError, Engines, Request, start_engines
from r1v.grading.rewards import check_failure_fraction, failures_by_reward, load_reward_modules
from r1v.rl.config import GRPOConfig
from r1v.rl.rollout import collect, replay
from r1v.rl.sampling import SelectiveSampleBuffer
from r1v.rl.update import RolloutBatch, grpo_update, reference_projector
from r1v.train import checkpoint
from r1v.train.device import engine_device, engine_dtype
from r1v.train.engine import (
    NonFiniteGuard,
    NonFiniteStepError,
    all_reduce_named,
    all_reduce_sum,
    export_model,
    gather_objects,
    gathered,
    init_engine,
    params_finite,
)
from r1v.train.launch import fit, publish, staged, worker_dir
from r1v.train.worker import load_trainable, start_worker, worker_progress


def load_prompts(c: GRPOConfig, rank: int, world: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This worker's prompts preprocessed for generation, and the quarantined: a contiguous balanced shard of the
    corpus rows (`balanced_shard`), in corpus order. Only the Parquet row groups holding them are read (images
    are inline in the corpus: every rank reading all of it costs the corpus's size per rank)."""
    # imported on use, to keep pyarrow out of light paths
    from r1v.data.pipeline import balanced_shard, prepare_prompts
    from r1v.data.reader import read_rows, row_count

    mine = balanced_shard(np.arange(row_count(c.corpus)), world, rank)
    table = read_rows(c.corpus, mine, columns=["id", "images", "messages", "answer", "source"])
    good, bad = prepare_prompts(table.drop_columns(["row"]).to_pylist(), c.model, c.preprocess)
    if not good:
        raise ValueError(f"rank {rank}: no usable prompts in {c.corpus} ({len(bad)} quarantined)")
    return good, bad


# What the replay buffer's prompt indices refer to: a checkpoint of a run that sliced prompts otherwise (before
# balanced shards: rows rank, rank + world, ...) must not resume its buffer against other prompts.
PROMPT_SHARDS = "balanced"


@functools.lru_cache(maxsize=4)
def pass_order(n: int, seed: int, epoch: int, rank: int) -> tuple[int, ...]:
    """The order of pass `epoch` over a rank's `n` prompts, drawn from (seed, epoch, rank) alone."""
    return tuple(np.random.default_rng([seed % 2**63, epoch, rank]).permutation(n).tolist())


def step_prompts(n: int, step: int, per_step: int, seed: int, rank: int, shuffle: bool = True) -> list[int]:
    """Indices of the prompts a rank takes at `step` (1-based): the next `per_step` of its passes over its `n`
    prompts, each pass (epoch) in `pass_order`, or in file order without `shuffle`. A pass ends mid-step when
    `n` is not a multiple of `per_step`: the step then takes the rest of it and the start of the next."""
    out = []
    for k in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(k, n)
        out.append(pass_order(n, seed, epoch, rank)[pos] if shuffle else pos)
    return out


def weight_groups(module: torch.nn.Module) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters grouped for the sync: each decoder layer's together, the rest by top-level module
    (`model.multi_modal_projector`, `lm_head`, ...), in parameter order."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            layer = re.match(r"(.*\.layers\.\d+)\.", name)
            groups.setdefault(layer.group(1) if layer else ".".join(name.split(".")[:2]), []).append((name, p))
    return list(groups.values())


def check_reward_failures(rounds: list[RolloutBatch], c: GRPOConfig, step: int) -> None:
    """Fail the stage (`RewardFailureError`) when a reward failed on more than `max_reward_failure_fraction` of
    the samples generated in the step, over all ranks and rollout rounds, before the update uses its rewards.
    Every rank must call it: the counts are all-reduced, so all ranks raise together."""
    names = list(c.rewards)
    local: dict[str, float] = {}
    for b in rounds:
        for k, v in b.reward_failures.items():
            local[k] = local.get(k, 0.0) + v
    failed = failures_by_reward(local, names)
    scored, *counts = all_reduce_sum([float(sum(len(b.flat) for b in rounds)), *failed.values()])
    failed = dict(zip(names, counts, strict=True))
    if not any(n > c.max_reward_failure_fraction * scored for n in failed.values()):
        return
    first: dict[str, str] = {}
    for errors in gather_objects([b.reward_errors for b in rounds]):  # the message may be on another rank only
        for e in errors:
            for k, msg in e.items():
                first.setdefault(k, msg)
    check_failure_fraction(failed, scored, c.max_reward_failure_fraction, first, f"step {step}")


def step_metrics(rounds: list[RolloutBatch], rb: RolloutBatch, out: dict[str, Any], extra: dict[str, float]
                 ) -> dict[str, float]:
    """This rank's sums for a step, by name (`finish_metrics` turns the all-ranks sums into means). Rewards are
    those of every sample generated this step (all dynamic-sampling rounds), not only the ones trained on."""
    gen = [(cp, r) for b in rounds for cp, r in zip(b.flat, b.rewards, strict=True)]
    sums = {"samples": float(len(gen)), "reward": sum(r for _, r in gen),
            "response_length": float(sum(len(cp.token_ids) for cp, _ in gen)),
            "finished_fraction": float(sum(cp.finished for cp, _ in gen)),
            "loss": out["loss"], "kl": out["kl"], "loss_tokens": out["loss_tokens"],
            "mismatch_abs_sum": out["mismatch_abs_sum"], "mismatch_tokens": out["mismatch_tokens"],
            "optimizer_steps": out["optimizer_steps"], "grad_norm": out["grad_norm"]}
    for b in rounds:
        for k, v in b.reward_parts.items():
            sums[f"reward_{k}"] = sums.get(f"reward_{k}", 0.0) + sum(v)
    for k, v in out["token_stats"].items():
        sums[f"tok_{k}"] = v
    for k, v in out["failures"].items():  # e.g. accuracy/timeout, raises/error/ZeroDivisionError
        sums["reward_failures_" + re.sub(r"[^\w/.-]", "_", k)] = float(v)
    for k, v in out["timings"].items():
        sums[f"time_{k}"] = v
    return {**sums, **extra}


def finish_metrics(g: dict[str, float], world: int) -> dict[str, float]:
    """Means over samples / tokens / ranks from the all-reduced sums of `step_metrics`."""
    n, tok = max(g.pop("samples"), 1.0), max(g.pop("loss_tokens"), 1.0)
    m = {"reward": g.pop("reward") / n, "response_length": g.pop("response_length") / n,
         "finished_fraction": g.pop("finished_fraction") / n, "loss": g.pop("loss") / world,
         "kl": g.pop("kl") / world, "optimizer_steps": g.pop("optimizer_steps") / world}
    mis_tok = g.pop("mismatch_tokens")
    mis = g.pop("mismatch_abs_sum")
    if mis_tok:
        m["logprob_mismatch"] = mis / mis_tok  # mean |trainer - rollout engine| log-prob per response token
    for k in list(g):
        if k.startswith("reward_failures_") or k in ("replayed", "sync_bytes") or k.startswith("groups_"):
            m[k] = g.pop(k)
        elif k.startswith("reward_"):
            m[k] = g.pop(k) / n
        elif k.startswith("tok_"):  # the policy loss's per-token flags: clip -> clip_frac, dual_clip_frac, ...
            m[f"{k[4:]}_frac"] = g.pop(k) / tok
        elif k.startswith("time_"):
            m[f"{k[5:]}_seconds"] = g.pop(k) / world  # mean over ranks
        else:
            m[k] = g.pop(k) / world
    if "reward_accuracy" in m:
        m["accuracy"] = m["reward_accuracy"]
    return m


def grpo_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker function: Ray brings the prompts' completions (rollout actors) and the checkpoints; the
    phases after the rollout (`r1v.rl.update`) run without Ray.

    One step: rollout (+ score, dynamic sampling: `r1v.rl.rollout.collect`) -> replay (optional) -> prepare,
    log-probs, update (`grpo_update`) -> sync (trainable tensors to the engines) -> metrics, all-reduced by name.
    """
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    import ray

    from r1v.model.assemble import tile_size

    c = staged(GRPOConfig.model_validate(cfg["config"]))
    rank, world, log = start_worker(c.trainer, cfg["tracking_uri"], cfg["run_id"])
    load_reward_modules(c.reward_modules, list(c.rewards))
    engines = Engines(cfg["engines"], c.engine.call_timeout_s, c.engine.ready_timeout_s)
    mine = rank % len(engines.handles)  # this rank's rollout engine
    engines.ready()  # where they run, for messages
    prompts, bad = load_prompts(c, rank, world)
    for i, p in enumerate(prompts):
        p["_index"] = i  # the replay buffer keeps this index, not the row (its state goes into a JSON checkpoint)
    model, tok, counts = load_trainable(c.model, c.trainer, c.trainable)
    n_batch = c.prompts_per_step * c.group_size
    mini, micro = c.batch_sizes(n_batch)
    engine = init_engine(model, c.trainer, c.optim, c.steps * c.ppo_epochs * (n_batch // mini), micro,
                         mini // micro)
    # The KL reference: frozen backbones + the projector as it starts, on the engine's device and in its dtype.
    ref_projector = (reference_projector(engine.module, engine_device(engine), engine_dtype(engine))
                     if c.kl_coef > 0 else None)
    portable = checkpoint.portable(c.trainable, c.trainer)
    restored = checkpoint.restore(engine, rank, portable=portable)
    state = restored.state if restored else {"step": 0}
    buffer = SelectiveSampleBuffer(c.replay.capacity)
    # The buffer holds this rank's prompts by index in its slice: it resumes only on as many workers, sliced the
    # same way (otherwise it starts empty, as a fresh run's does).
    if (restored and restored.rank_state and restored.rank_state.get("replay")
            and restored.rank_state.get("prompt_shards") == PROMPT_SHARDS):
        buffer.load_state_dict(restored.rank_state["replay"])
    module = engine.module
    tile = tile_size(model)
    quarantined = sum(all_reduce_sum([float(len(bad))]))
    if rank == 0:
        log.params({"trainable_params": counts})
        log.metrics({"prompts_quarantined": quarantined}, 0)
        print(f"[grpo] trainable {counts}; {len(prompts)} prompts on rank 0; starting at step {state['step']}")

    groups = weight_groups(module)
    guard = NonFiniteGuard(c.trainer.max_nonfinite_steps, "grpo")
    progress = worker_progress(cfg, rank, log)

    def lost_anywhere(lost: EngineLostError | None, what: str, attempt: int) -> bool:
        """Whether an engine was lost on any rank (a collective: every rank calls it at the same point). Past
        `max_restarts` re-runs, every rank fails naming the lost engines. After a loss every rank waits for the
        engines itself (`Engines.ready`, within its deadline), not in a collective, whose own timeout (Ray
        Train's, 30 min) would end the wait for a large model's reload with a less telling error."""
        msgs = [m for m in gather_objects(str(lost) if lost else None) if m]
        if not msgs:
            return False
        if attempt >= c.engine.max_restarts:
            raise EngineGoneError(f"{what}: engines lost {attempt + 1} times (engine.max_restarts "
                                  f"{c.engine.max_restarts}): " + "; ".join(msgs))
        if rank == 0:
            print(f"[grpo] {what}: {'; '.join(msgs)}; waiting for the restarted engines, pushing the weights again")
        return True

    def push_weights(version: int) -> tuple[float, float]:
        """The trainable tensors to every engine, one group (a decoder layer, the projector) at a time: rank 0
        never holds more than one gathered layer, and vLLM gets a fused layer's parts in one call. `version`
        (the step whose update they are) lets an engine tell that it holds them; an engine lost during the push
        is waited for and the push repeated, on every rank (the gathers are collectives)."""
        t0 = time.perf_counter()
        every = list(range(len(engines.handles)))
        for attempt in range(c.engine.max_restarts + 1):
            lost: EngineLostError | None = None
            sent = 0.0
            for part, group in enumerate(groups):
                with gathered([p for _, p in group]):
                    tensors = {n: p.detach().to("cpu", copy=True) for n, p in group} if rank == 0 else {}
                if rank == 0 and lost is None:
                    try:
                        engines.call("update_weights", every, ray.put(tensors), version, part)
                    except EngineLostError as e:
                        lost = e  # keep gathering with the other ranks; the push is repeated below
                    sent += sum(t.numel() * t.element_size() for t in tensors.values())
            if rank == 0 and lost is None:
                try:  # an engine that restarted between two groups holds only the later ones
                    done = engines.call("commit_weights", every, version, len(groups))
                    if not all(done):
                        i = done.index(False)
                        lost = EngineLostError(i, f"{engines.name(i)} restarted during the weight update")
                except EngineLostError as e:
                    lost = e
            if not lost_anywhere(lost, f"weight update {version}", attempt):
                return time.perf_counter() - t0, sent
            engines.ready()
        raise AssertionError("unreachable: lost_anywhere raises past max_restarts")

    push_weights(state["step"])  # engines start from the base checkpoint; after a resume they need the trained ones
    for step in range(state["step"] + 1, c.steps + 1):
        t0 = time.perf_counter()

        def prompts_for_round(r: int, step: int = step) -> list[dict[str, Any]]:
            # round 0 is the step's own prompts; refill rounds draw from streams of their own, so the prompts
            # of (step, round) are fixed whatever happened before: a resumed run takes the same ones
            idx = step_prompts(len(prompts), step, c.prompts_per_step, c.trainer.seed + 1_000_003 * r, rank,
                               c.shuffle or r > 0)
            return [prompts[i] for i in idx]

        def generate(ps: list[dict[str, Any]], r: int, step: int = step) -> list[list[Any]]:
            reqs = [Request(p["input_ids"], p["pixel_values"], p["n_tiles"]) for p in ps]
            # `version`: the engine refuses to roll out under other weights than the previous step's update
            # (a restarted one holds the base model's until they are pushed again)
            return engines.call("generate", [mine], reqs, c.sampling.model_dump(), c.group_size,
                                c.trainer.seed * 100_003 + step * 1009 + rank + 7919 * r, version=step - 1)[0]

        collected = None
        for attempt in range(c.engine.max_restarts + 1):
            lost = None
            if collected is None:  # a rank whose rollout finished keeps it: seeds and weights fix its result
                try:
                    collected = collect(generate, prompts_for_round, c)
                except EngineLostError as e:
                    lost = e
            if not lost_anywhere(lost, f"step {step} rollout", attempt):
                break
            engines.ready()
            push_weights(step - 1)
        assert collected is not None
        rb, extra, rounds = collected
        check_reward_failures(rounds, c, step)
        if c.replay.enabled:
            rng = np.random.default_rng([c.trainer.seed % 2**63, step, rank, 17])
            rb, extra["replayed"] = replay(rb, buffer, c, prompts, rng)
        out = grpo_update(engine, rb, c, tok.pad_token_id, tile, world, ref_projector)
        for where, outcome in out["nonfinite"]:  # raises on every rank alike, before the sync and any save
            guard.record(outcome, f"step {step} ({where})")
        extra["nonfinite_steps"] = float(guard.skipped)
        t_sync, sync_bytes = push_weights(step)
        out["timings"]["sync"] = t_sync
        extra["sync_bytes"] = sync_bytes / world  # rank 0's tensors, summed over ranks by the all-reduce
        sums = all_reduce_named(step_metrics(rounds, rb, out, extra))
        if rank == 0:
            metrics = finish_metrics(dict(sums), world)
            metrics.update(lr=engine.get_lr()[0], step_seconds=time.perf_counter() - t0)
            log.metrics(metrics, step)
            progress.update(step, c.steps, reward=metrics["reward"], accuracy=metrics.get("accuracy"))
            print(f"[grpo] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if step % c.sample_log_every == 0 or step == 1:
                first = rounds[0]
                rows = [{"step": step, "id": s["id"], "answer": s["answer"], "completion": cp.text, "reward": r}
                        for s, cp, r in zip(first.samples, first.flat, first.rewards, strict=True)]
                log.table_rows(rows, f"samples/step-{step:05d}.jsonl")
                # the same samples for MLflow's table viewer, with the prompt and its image
                log.table([{**row, "question": question(s), "images": s.get("images")}
                           for row, s in zip(rows, first.samples, strict=True)],
                          f"samples/step-{step:05d}.json", images="images")
        if step % c.checkpoint_every == 0 or step == c.steps:
            if not params_finite(engine):  # only a finite update that overflowed gets here: keep the last good one
                raise NonFiniteStepError(f"grpo step {step}: trainable parameters are not finite after the update; "
                                         "not checkpointing them")
            checkpoint.save(engine, step, {"step": step}, {"reward": sums["reward"] / max(sums["samples"], 1.0)},
                            rank, portable=portable,
                            rank_state={"replay": buffer.state_dict() if c.replay.enabled else None,
                                        "prompt_shards": PROMPT_SHARDS})

    export_model(engine, c.model, worker_dir(cfg) / "model", rank)
    if rank == 0:
        publish(cfg, "model")


def train_grpo(c: GRPOConfig, stage_dir: Path, tracking_uri: str | None, run_id: str | None,
               stage_uri: str | None = None, host: type[EngineHost] | None = None) -> dict[str, Any]:
    """Driver side: start the rollout actors (`host`: another EngineHost class, for tests), run the trainer
    workers, stop the actors."""
    import ray

    load_reward_modules(c.reward_modules, list(c.rewards))  # fail before starting anything
    engines = start_engines(c.engine.kind, c.model, c.engine.num_engines, c.engine.num_cpus, c.engine.num_gpus,
                            c.engine.max_batch, dtype=c.engine.resolved_dtype(), options=c.engine.kind_options(),
                            host=host, max_restarts=c.engine.max_restarts, ready_timeout_s=c.engine.ready_timeout_s)
    try:
        loop_cfg = {"config": c.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                    "stage_dir": str(stage_dir), "stage_uri": stage_uri, "engines": engines}
        fit(grpo_loop, loop_cfg, c.trainer, stage_dir / "ray", c.keep_checkpoints)
    finally:
        for e in engines:
            ray.kill(e)
    return {"model": storage.join(stage_uri, "model") if stage_uri else stage_dir / "model"}
