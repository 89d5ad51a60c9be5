"""GRPO with rule-based rewards: rollout actors generate, Ray Train workers under DeepSpeed update.

One step, on every worker (each owns a slice of the prompts, all G samples of a prompt stay on one worker):
  1. ask its rollout engine for G samples of each of its prompts;
  2. score rewards, compute group advantages;
  3. vision features once per prompt (frozen tower), reused by the old, reference and policy passes;
  4. old log-probs (current policy) and reference log-probs (frozen backbones + the *starting* projector);
  5. clipped-surrogate (+ optional k3 KL) updates;
  6. gather the trainable tensors; rank 0 pushes them to every engine before the next rollout.

Prompts are taken in passes over the worker's slice, each pass in a permutation seeded by (seed, pass, rank):
the prompts of a step are a function of the step number alone, so a run resumed at step k takes the same
prompts as one that never stopped. The policy loss is a token mean over the response tokens of all ranks.
"""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1v.config import GRPOConfig
from r1v.data.collate import tiles_from_bytes
from r1v.rl.algos import ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, masked_mean, token_logprobs
from r1v.rl.engines import Request
from r1v.rl.rewards import load_reward_modules, score
from r1v.train import checkpoint
from r1v.train.engine import all_reduce_sum, barrier, export_model, init_engine, named_tensors
from r1v.train.launch import setup_worker


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


def build_batch(prompts: list[dict[str, Any]], comps: list[list[Any]], pad_id: int
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


def grpo_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker function."""
    import ray

    from r1v.model.assemble import tile_size
    from r1v.model.forward import vision_features
    from r1v.model.freeze import apply_freeze
    from r1v.model.io import load_model
    from r1v.tracking import RunLogger

    c = GRPOConfig.model_validate(cfg["config"])
    rank, world = setup_worker(c.trainer)
    load_reward_modules(c.reward_modules, list(c.rewards))
    log = RunLogger(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else RunLogger(None, None)
    engines = cfg["engines"]
    rollout = engines[rank % len(engines)]
    prompts, bad = load_prompts(c, rank, world)
    model, tok = load_model(c.model)
    ref_projector = copy.deepcopy(model.model.multi_modal_projector).requires_grad_(False).eval()
    counts = apply_freeze(model, c.trainable)
    engine = init_engine(model, c.trainer, c.optim, c.steps * c.ppo_epochs, c.prompts_per_step * c.group_size)
    state = checkpoint.restore(engine, rank) or {"step": 0}
    module = engine.module
    adv_fn, loss_fn, kl_fn = ADVANTAGES.get(c.advantage), POLICY_LOSSES.get(c.policy_loss), KL_ESTIMATORS.get(
        c.kl_estimator)
    tile = tile_size(model)
    temp = c.sampling.temperature if c.sampling.temperature > 0 else 1.0
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
        flat = [cp for g in comps for cp in g]
        samples = [p for p in batch_prompts for _ in range(c.group_size)]
        total, per = score([cp.text for cp in flat], samples, c.rewards)
        rewards = torch.tensor(total, dtype=torch.float32).view(len(batch_prompts), c.group_size)
        adv = adv_fn(rewards).reshape(-1)
        batch = build_batch(batch_prompts, comps, tok.pad_token_id)
        mask = batch["response_mask"]
        pixels = torch.from_numpy(np.concatenate([  # uint8: vision_features normalises next to the model
            tiles_from_bytes(p["pixel_values"], p["n_tiles"], tile) for p in batch_prompts]))
        with torch.set_grad_enabled("vision" in c.trainable):
            feats = vision_features(module, pixels)
        per_prompt = torch.split(feats, [p["n_tiles"] for p in batch_prompts])
        feats_rep = torch.cat([f for f in per_prompt for _ in range(c.group_size)])
        with torch.no_grad():
            old = sequence_logprobs(module, batch, feats_rep, temp)
            ref = sequence_logprobs(module, batch, feats_rep, temp, ref_projector) if c.kl_coef > 0 else None
        stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        # Token means over every rank's response tokens: DeepSpeed averages gradients over ranks, hence / world.
        tokens = all_reduce_sum([float(mask.sum())])[0] / world
        for _ in range(c.ppo_epochs):
            logp = sequence_logprobs(module, batch, feats_rep, temp)
            pg, clip_frac = loss_fn(logp, old, adv, mask, c.clip_eps, tokens=tokens)
            kl = masked_mean(kl_fn(logp, ref), mask, tokens) if ref is not None else torch.zeros(())
            loss = pg + c.kl_coef * kl
            engine.backward(loss)
            engine.step()
            stats = {"loss": float(loss.detach()), "kl": float(kl.detach()), "clip_frac": float(clip_frac)}
        push_weights()
        n = float(len(flat))
        sums = all_reduce_sum([sum(total), sum(per.get("accuracy", [0.0])), sum(len(cp.token_ids) for cp in flat),
                               n, stats["loss"], stats["kl"], stats["clip_frac"],
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
