"""Self-distillation on the miniature over several seeds: does the distilled corpus give harder
items longer chains than easy ones, and does SFT on it keep accuracy while answering easy items in fewer tokens?

Per seed, one temporary workflow run (`r1v run`) on 2 cores:
  data (data.world: `--n-sft` SFT rows, `--n-test` test items, the seed's corpora)
  -> score (distill.score: QDAM/VTIA cues, DRLC penalty) -> distill (the seed's SFT model from a finished demo
  run writes a chain per row at the row's penalty; wrong ones rewritten by the `rule` judge)
  -> sft_orig / sft_dist: the demo's SFT config from the seed's re-assembled model on the original / the distilled
  corpus -> eval_orig / eval_dist: the test split, greedy.
The "current model" and the re-assembled model come from finished demo runs (`--models SEED=RUN_DIR`, defaults:
seed 0 runs/final, seeds 1 and 2 runs/bench-world/seed-N). Prints per seed, and mean ± sd over seeds: chain
tokens per level (OLS slope) before (the corpus's reference chains) and after distillation, and for both trained
models greedy accuracy ± stderr, accuracy on level 1, mean response tokens overall and on level 1.

    python bench/world_distill.py [--seeds 0 1 2] [--n-sft 600] [--n-test 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = {0: ROOT / "runs" / "final", 1: ROOT / "runs" / "bench-world" / "seed-1",
                  2: ROOT / "runs" / "bench-world" / "seed-2"}
SFT = {"optim": {"lr": 1.0e-3}, "batch_size": 1, "packing": True, "max_tokens": 512, "pack_buffer": 64,
       "epochs": 1, "checkpoint_every": 20}  # workflows/tiny.yaml's `sft` stage
EVAL = {"samples": 1, "sampling": {"temperature": 1.0, "max_new_tokens": 96}}


def workflow(seed: int, sft_model: Path, base_model: Path, n_sft: int, n_test: int, run_root: Path,
             max_new_tokens: int) -> dict[str, Any]:
    """The seed's temporary workflow (see the module doc)."""
    return {
        "name": "distill-bench", "run_root": str(run_root), "seed": seed,
        "tracking": {"experiment": "r1v-distill-bench"}, "ray": {"num_cpus": 2},
        "stages": {
            "data": {"kind": "data.world", "config": {"n_align": 1, "n_sft": n_sft, "n_grpo": 1, "n_test": n_test}},
            "score": {"kind": "distill.score", "config": {"corpus": "@data.sft"}},
            "distill": {"kind": "distill", "config": {
                "model": str(sft_model), "corpus": "@score.corpus", "judge": {"kind": "rule"},
                "sampling": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": max_new_tokens}}},
            "sft_orig": {"kind": "sft", "config": {"model": str(base_model), "corpus": "@data.sft", **SFT}},
            "sft_dist": {"kind": "sft", "config": {"model": str(base_model), "corpus": "@distill.corpus", **SFT}},
            "eval_orig": {"kind": "eval", "config": {"model": "@sft_orig.model", "corpus": "@data.test", **EVAL}},
            "eval_dist": {"kind": "eval", "config": {"model": "@sft_dist.model", "corpus": "@data.test", **EVAL}},
        }}


def stage_model(run_dir: Path, stage: str) -> Path:
    p = run_dir / "stages" / stage / "model"
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"no finished {stage} model in {run_dir}")
    return p


def run_seed(seed: int, models_run: Path, args: argparse.Namespace) -> Path:
    run_dir = args.run_root / f"seed-{seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    wf = args.run_root / f"seed-{seed}.yaml"
    wf.write_text(yaml.safe_dump(workflow(seed, stage_model(models_run, "sft"), stage_model(models_run, "reassemble"),
                                          args.n_sft, args.n_test, args.run_root, args.max_new_tokens),
                                 sort_keys=False))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "r1v.cli", "run", str(wf), "--run-dir", str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return run_dir


def eval_figures(predictions: Path) -> dict[str, Any]:
    """Greedy accuracy ± stderr, accuracy and mean response tokens overall and on level 1, from predictions."""
    rows = [r for r in map(json.loads, predictions.read_text().splitlines()) if r.get("greedy")]

    def acc(rs: list[dict]) -> tuple[float, float]:
        p = sum(r["correct"] for r in rs) / len(rs)
        return p, math.sqrt(p * (1 - p) / len(rs))

    easy = [r for r in rows if r.get("level") == 1]
    (a, se), (ae, see) = acc(rows), acc(easy)
    return {"n": len(rows), "accuracy": a, "stderr": se, "n_easy": len(easy), "accuracy_easy": ae,
            "stderr_easy": see, "tokens": statistics.mean(r["n_tokens"] for r in rows),
            "tokens_easy": statistics.mean(r["n_tokens"] for r in easy),
            "tokens_by_level": {lv: statistics.mean(r["n_tokens"] for r in rows if r.get("level") == lv)
                                for lv in sorted({r.get("level") for r in rows})}}


def seed_figures(run_dir: Path) -> dict[str, Any]:
    from r1v.data.pipeline import load_tokenizer
    from r1v.distill.plots import distilled_points, length_stats, reference_points

    def st(stage: str) -> dict[str, Any]:
        return json.loads((run_dir / "stages" / stage / "state.json").read_text())["outputs"]

    summary = json.loads(Path(st("distill")["summary"]).read_text())
    model = json.loads((run_dir / "stages" / "distill" / "state.json").read_text())
    before = length_stats(reference_points(st("score")["corpus"], load_tokenizer(summary["config"]["model"])))
    after = length_stats(distilled_points(st("distill")["corpus"]))
    kept = length_stats(distilled_points(st("distill")["corpus"], "kept"))
    return {"distill": {k: summary[k] for k in ("rows_in", "kept", "rewritten", "dropped")} | {"model": summary[
                "config"]["model"], "seconds": model.get("seconds")},
            "before": before, "after": after, "kept": kept,
            "plot": str(run_dir / "stages" / "distill" / "lengths.png"),
            "orig": eval_figures(Path(st("eval_orig")["predictions"])),
            "dist": eval_figures(Path(st("eval_dist")["predictions"]))}


def mean_sd(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def report(per_seed: dict[int, dict[str, Any]]) -> None:
    print("\nchain tokens (corpus): mean by level 1/2/3, OLS slope tokens per level, slope per unit penalty")
    for s, f in per_seed.items():
        d = f["distill"]
        print(f"seed {s}: {d['rows_in']} rows -> {d['kept']} kept, {d['rewritten']} rewritten, {d['dropped']} dropped")
        for k in ("before", "after", "kept"):
            v = f[k]
            lv = " / ".join(f"{x:.1f}" for x in v["tokens_by_level"].values())
            print(f"  {k:<7} n={v['rows']:<4} {lv:<20} slope {v['slope_per_level']:+.2f} tok/level  "
                  f"{(v['slope_per_penalty'] or 0):+.2f} tok/penalty")
        pen = " / ".join(f"{x:.3f}" for x in f["before"].get("penalty_by_level", {}).values())
        print(f"  DRLC penalty by level 1/2/3: {pen}")
    print("over seeds (mean ± sd):")
    for k in ("before", "after", "kept"):
        print(f"  {k:<7} slope/level {mean_sd([f[k]['slope_per_level'] for f in per_seed.values()])}   "
              f"slope/penalty {mean_sd([f[k]['slope_per_penalty'] for f in per_seed.values()])}")
    print("\nSFT from the re-assembled model, test split greedy: accuracy ± stderr | level-1 accuracy | mean tokens "
          "all / level 1 / by level")
    for s, f in per_seed.items():
        for k in ("orig", "dist"):
            e = f[k]
            lv = "/".join(f"{x:.1f}" for x in e["tokens_by_level"].values())
            print(f"  seed {s} {k:<5} n={e['n']} {e['accuracy']:.3f} ± {e['stderr']:.3f} | L1 {e['accuracy_easy']:.3f} "
                  f"± {e['stderr_easy']:.3f} (n={e['n_easy']}) | {e['tokens']:.1f} / {e['tokens_easy']:.1f} / {lv}")
    print("over seeds (mean ± sd):")
    for k in ("orig", "dist"):
        print(f"  {k:<5} accuracy {mean_sd([f[k]['accuracy'] for f in per_seed.values()])}  "
              f"L1 accuracy {mean_sd([f[k]['accuracy_easy'] for f in per_seed.values()])}  "
              f"tokens {mean_sd([f[k]['tokens'] for f in per_seed.values()])}  "
              f"L1 tokens {mean_sd([f[k]['tokens_easy'] for f in per_seed.values()])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--models", nargs="*", default=[], help="SEED=RUN_DIR: finished demo run holding the seed's "
                    "sft and reassemble models")
    ap.add_argument("--n-sft", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="distill generation budget per chain")
    ap.add_argument("--run-root", type=Path, default=ROOT / "runs" / "bench-distill")
    ap.add_argument("--runs-only", action="store_true", help="read finished runs under --run-root, run nothing")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = DEFAULT_MODELS | {int(k): Path(v) for k, v in (m.split("=", 1) for m in args.models)}
    per_seed = {}
    for s in args.seeds:
        run_dir = args.run_root / f"seed-{s}" if args.runs_only else run_seed(s, models[s], args)
        per_seed[s] = seed_figures(run_dir)
    report(per_seed)
    if args.json:
        args.json.write_text(json.dumps({"n_sft": args.n_sft, "n_test": args.n_test, "seeds": per_seed},
                                        indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
