"""GRPO with rule-based rewards: rollout actors generate, Ray Train workers under DeepSpeed update.

One step, on every worker (each owns a slice of the prompts, all G samples of a prompt stay on one worker):
  1. ask its rollout engine for G samples of each of its prompts;
  2-5. `r1v.rl.update.grpo_update`, which needs no Ray: score rewards, compute group advantages; vision
     features once per prompt (frozen tower), reused by the old, reference and policy passes; old log-probs
     (current policy) and reference log-probs (frozen backbones + the *starting* projector); clipped-surrogate
     (+ optional k3 KL) updates;
  6. gather the trainable tensors; rank 0 pushes them to every engine before the next rollout.

Prompts are taken in passes over the worker's slice, each pass in a permutation seeded by (seed, pass, rank):
the prompts of a step are a function of the step number alone, so a run resumed at step k takes the same
prompts as one that never stopped. The policy loss is a token mean over the response tokens of all ranks.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from r1v.config import GRPOConfig
from r1v.rl.engines import Request
from r1v.rl.rewards import load_reward_modules
from r1v.rl.update import RolloutBatch, grpo_update, reference_projector
from r1v.train import checkpoint
from r1v.train.device import engine_device, engine_dtype
from r1v.train.engine import all_reduce_sum, barrier, export_model, init_engine, named_tensors
from r1v.train.launch import setup_worker
from r1v.train.loading import load_for_training


def load_prompts(c: GRPOConfig, rank: int, world: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This worker's prompts (rows rank, rank+world, ...) preprocessed for generation, and the quarantined."""
    import pyarrow.parquet as pq

    from r1v.data.pipeline import prepare_prompts

    table = pq.read_table(c.corpus, columns=["id", "images", "messages", "answer", "source"])
    good, bad = prepare_prompts(table.to_pylist()[rank::world], c.model, c.preprocess)
    if not good:
        raise ValueError(f"rank {rank}: no usable prompts in {c.corpus} ({len(bad)} quarantined)")
    return good, bad


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


def grpo_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker function: Ray brings the prompts' completions (rollout actors) and the checkpoints; the
    update itself is `r1v.rl.update.grpo_update`, which runs without Ray."""
    import ray

    from r1v.model.assemble import tile_size
    from r1v.model.freeze import apply_freeze
    from r1v.tracking import RunLogger

    c = GRPOConfig.model_validate(cfg["config"])
    rank, world = setup_worker(c.trainer)
    load_reward_modules(c.reward_modules, list(c.rewards))
    log = RunLogger(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else RunLogger(None, None)
    engines = cfg["engines"]
    rollout = engines[rank % len(engines)]
    prompts, bad = load_prompts(c, rank, world)
    model, tok = load_for_training(c.model, c.trainer)  # ZeRO-3: partitioned from the start
    counts = apply_freeze(model, c.trainable)
    engine = init_engine(model, c.trainer, c.optim, c.steps * c.ppo_epochs, c.prompts_per_step * c.group_size)
    # The KL reference: frozen backbones + the projector as it starts, on the engine's device and in its dtype.
    ref_projector = (reference_projector(engine.module, engine_device(engine), engine_dtype(engine))
                     if c.kl_coef > 0 else None)
    state = checkpoint.restore(engine, rank) or {"step": 0}
    module = engine.module
    tile = tile_size(model)
    quarantined = sum(all_reduce_sum([float(len(bad))]))
    if rank == 0:
        log.params({"trainable_params": counts})
        log.metrics({"prompts_quarantined": quarantined}, 0)
        print(f"[grpo] trainable {counts}; {len(prompts)} prompts on rank 0; starting at step {state['step']}")

    def push_weights() -> None:
        tensors = named_tensors(module, only_trainable=True, rank=rank)
        if rank == 0:
            ray.get([e.update_weights.remote(tensors) for e in engines])
        barrier()

    push_weights()  # engines start from the base checkpoint; after a resume they need the trained tensors
    for step in range(state["step"] + 1, c.steps + 1):
        t0 = time.time()
        idx = step_prompts(len(prompts), step, c.prompts_per_step, c.trainer.seed, rank, c.shuffle)
        batch_prompts = [prompts[i] for i in idx]
        reqs = [Request(p["input_ids"], p["pixel_values"], p["n_tiles"]) for p in batch_prompts]
        comps = ray.get(rollout.generate.remote(reqs, c.sampling.model_dump(), c.group_size,
                                                c.trainer.seed * 100_003 + step * 1009 + rank))
        t_gen = time.time() - t0
        rb = RolloutBatch(batch_prompts, comps)
        out = grpo_update(engine, rb, c, tok.pad_token_id, tile, world, ref_projector)
        push_weights()
        flat, samples, total, per = rb.flat, rb.samples, out["total"], out["per"]
        n = float(len(flat))
        sums = all_reduce_sum([sum(total), sum(per.get("accuracy", [0.0])), sum(len(cp.token_ids) for cp in flat),
                               n, out["loss"], out["kl"], out["clip_frac"],
                               float(sum(cp.finished for cp in flat)), t_gen])
        if rank == 0:
            metrics = {"reward": sums[0] / sums[3], "accuracy": sums[1] / sums[3],
                       "response_length": sums[2] / sums[3], "finished_fraction": sums[7] / sums[3],
                       "loss": sums[4] / world, "kl": sums[5] / world, "clip_frac": sums[6] / world,
                       "lr": engine.get_lr()[0], "rollout_seconds": sums[8] / world,
                       "step_seconds": time.time() - t0}
            metrics.update({f"reward_{k}": sum(v) / len(v) for k, v in per.items()})
            log.metrics(metrics, step)
            print(f"[grpo] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if step % c.sample_log_every == 0 or step == 1:
                log.table_rows([{"step": step, "id": s["id"], "answer": s["answer"], "completion": cp.text,
                                 "reward": r} for s, cp, r in zip(samples, flat, total, strict=True)],
                               f"samples/step-{step:05d}.jsonl")
        if step % c.checkpoint_every == 0 or step == c.steps:
            checkpoint.save(engine, step, {"step": step}, {"reward": sums[0] / sums[3]}, rank)

    export_model(engine, c.model, Path(cfg["stage_dir"]) / "model", rank)


def train_grpo(c: GRPOConfig, stage_dir: Path, tracking_uri: str | None, run_id: str | None) -> dict[str, Any]:
    """Driver side: start the rollout actors, run the trainer workers, stop the actors."""
    import ray

    from r1v.rl.engines import start_engines
    from r1v.train.launch import fit

    load_reward_modules(c.reward_modules, list(c.rewards))  # fail before starting anything
    engines = start_engines(c.engine.kind, c.model, c.engine.num_engines, c.engine.num_cpus, c.engine.num_gpus,
                            c.engine.max_batch)
    try:
        loop_cfg = {"config": c.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                    "stage_dir": str(stage_dir), "engines": engines}
        fit(grpo_loop, loop_cfg, c.trainer, stage_dir / "ray", c.keep_checkpoints)
    finally:
        for e in engines:
            ray.kill(e)
    return {"model": stage_dir / "model"}
