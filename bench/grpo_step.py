"""Where a GRPO step's time goes, per rollout engine, on the miniature world, in one process without Ray.

    python bench/grpo_step.py                                   # every engine that imports here
    python bench/grpo_step.py --engines transformers --steps 2 --prompts 2 --group 4   # a quick look
    python bench/grpo_step.py --model runs/final/stages/sft/model   # a trained projector: realistic lengths

Each step runs the product's own phases (`r1v.rl.rollout.collect` -> `r1v.rl.update.grpo_update` -> sync:
the trainable tensors gathered and loaded into the engine) under a real DeepSpeed engine (ZeRO-3, world size
1) and prints, per engine: seconds per phase (rollout, reward, vision, logprobs, update, sync) and their share
of the step, the mean reward, the bytes synced, vision-tower passes per prompt image in the trainer (1: each
prompt's tiles once, whatever its group size), and rollout tokens/s. The engines
run in this process, as they would inside their Ray actor.

Without --model, the model is the world's re-assembly with a fresh projector (rollouts run to max_new_tokens:
the worst case for the rollout share); the first step of each engine is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("rollout", "reward", "vision", "logprobs", "update", "sync")


def world_model(tmp: Path) -> str:
    """The world's vision tower + a fresh projector in front of the reasoning LLM (a manifest directory)."""
    from r1v.model.manifest import reassemble_model
    from r1v.world.load import substitute_vlm

    sub = substitute_vlm(None, 0, tmp / "substitute")
    return str(reassemble_model(str(sub["model"]), str(sub["reasoning_llm"]), tmp / "model"))


def world_prompts(model_dir: str, tmp: Path, n: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import prepare_prompts
    from r1v.world.corpora import generate

    paths = generate(tmp / "corpus", n_align=0, n_sft=0, n_grpo=n, n_test=0, seed=0)
    rows = pq.read_table(paths["grpo"], columns=["id", "images", "messages", "answer", "source"]).to_pylist()
    good, _ = prepare_prompts(rows, model_dir, PreprocessConfig())
    for i, p in enumerate(good):
        p["_index"] = i
    return good


def run_engine(kind: str, model_dir: str, prompts: list[dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    from r1v.core.config import OptimConfig, TrainerConfig
    from r1v.generation.engines import ENGINES, Request
    from r1v.model.assemble import tile_size
    from r1v.model.freeze import apply_freeze
    from r1v.rl.config import GRPOConfig
    from r1v.rl.rollout import collect
    from r1v.rl.update import grpo_update
    from r1v.train.engine import init_engine, named_tensors
    from r1v.train.loading import load_for_training

    c = GRPOConfig(model=model_dir, corpus="unused", group_size=a.group, prompts_per_step=a.prompts,
                   micro_batch=a.micro_batch, sampling={"temperature": 1.0, "max_new_tokens": a.max_new_tokens},
                   rewards={"accuracy": 1.0, "format": 0.5})
    trainer = TrainerConfig(num_workers=1, zero_stage=3)
    model, tok = load_for_training(model_dir, trainer)
    apply_freeze(model, ["projector"])
    mini, micro = a.prompts * a.group, min(a.micro_batch or a.prompts * a.group, a.prompts * a.group)
    engine = init_engine(model, trainer, OptimConfig(lr=1e-4, warmup_ratio=0.0), a.steps + 1, micro, mini // micro)
    tower_tiles = [0]  # tiles through the trainer's vision tower: one pass per prompt means one per prompt tile

    def count_tiles(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        px = args[0] if args else kwargs.get("pixel_values")
        tower_tiles[0] += int(px.shape[0]) if px is not None else 0

    engine.module.model.vision_tower.register_forward_hook(count_tiles, with_kwargs=True)
    t0 = time.perf_counter()
    rollout_engine = ENGINES.get(kind)(model_dir, max_batch=a.prompts * a.group)
    load_s = time.perf_counter() - t0
    tile = tile_size(engine.module)
    rows: list[dict[str, float]] = []
    for step in range(a.steps + 1):
        t_step = time.perf_counter()
        tower_tiles[0] = 0

        def prompts_for_round(r: int, step: int = step) -> list[dict[str, Any]]:
            k = (step * a.prompts) % len(prompts)
            return (prompts * 2)[k : k + a.prompts]

        def generate(ps: list[dict[str, Any]], r: int, step: int = step):
            reqs = [Request(p["input_ids"], p["pixel_values"], p["n_tiles"]) for p in ps]
            return rollout_engine.generate(reqs, c.sampling.model_dump(), c.group_size, 1000 * step + r)

        rb, _, rounds = collect(generate, prompts_for_round, c)
        out = grpo_update(engine, rb, c, tok.pad_token_id, tile, 1)
        t_sync = time.perf_counter()
        tensors = named_tensors(engine.module, only_trainable=True, rank=0)
        rollout_engine.update_weights(tensors)
        times = dict(out["timings"], sync=time.perf_counter() - t_sync)
        total = time.perf_counter() - t_step
        tokens = sum(len(cp.token_ids) for b in rounds for cp in b.flat)
        print(f"  {kind} step {step}{' (warm-up)' if step == 0 else ''}: {total:.3f}s = "
              + ", ".join(f"{p} {times.get(p, 0.0):.3f}" for p in PHASES), flush=True)
        if step == 0:
            continue  # warm-up
        rows.append({**{p: times.get(p, 0.0) for p in PHASES}, "step": total, "tokens": float(tokens),
                     "sync_bytes": float(sum(t.numel() * t.element_size() for t in tensors.values())),
                     "vit_per_prompt": tower_tiles[0] / max(1, sum(p["n_tiles"] for p in rb.prompts)),
                     "mean_reward": sum(rb.rewards) / len(rb.rewards)})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["tokens_per_s"] = mean["tokens"] / max(mean["rollout"], 1e-9)
    mean["engine_load_s"] = load_s
    return mean


def available(kind: str) -> str | None:
    """None when the engine can run here, else why not."""
    import importlib.util

    from r1v.generation.engines import ENGINES

    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed"
    return None if kind in ENGINES else f"no engine {kind!r} registered"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    ap.add_argument("--model", help="a VLM or manifest directory (default: the world's re-assembly)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per engine (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from gpu_step import init_process_group

    init_process_group("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = a.model or world_model(tmp)
        prompts = world_prompts(model_dir, tmp, max(64, a.prompts * (a.steps + 1)))
        for kind in a.engines:
            why = available(kind)
            if why:
                print(f"{kind}: skipped ({why})")
                results[kind] = {"skipped": why}
                continue
            r = run_engine(kind, model_dir, prompts, a)
            results[kind] = r
            share = ", ".join(f"{p} {r[p]:.3f}s ({100 * r[p] / r['step']:.1f}%)" for p in PHASES)
            other = r["step"] - sum(r[p] for p in PHASES)  # batching, bookkeeping: the phases do not time it
            print(f"{kind}: step {r['step']:.3f}s = {share}, other {other:.3f}s; mean reward "
                  f"{r['mean_reward']:.2f}; sync {r['sync_bytes'] / 1e3:.1f} kB; "
                  f"ViT passes per prompt image {r['vit_per_prompt']:.2f}; rollout {r['tokens_per_s']:.0f} tokens/s "
                  f"({r['tokens']:.0f} tokens); engine load {r['engine_load_s']:.1f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
