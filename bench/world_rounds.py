"""The miniature's iterative SFT rounds over several seeds: does accuracy rise round by round, and by more than the
run-to-run spread? (The paper: 62.5 -> 63.9 -> 64.7 -> 65.2 -> 65.6 on MMMU.)

Runs `r1v run workflows/tiny.yaml seed=N` for each seed (a full demo run each, ~10 minutes on 2 cores), or
reads finished runs (`--runs DIR ...`), and prints per seed the greedy accuracy ± stderr of sft (M0), each round
and grpo, each round's corpus (rows by score + as errors), and each step's change in standard errors of the
difference, sqrt(se_a^2 + se_b^2); then, per row, the mean over seeds and the seeds' standard deviation (the
run-to-run spread that a round's gain has to beat).

    python bench/world_rounds.py --seeds 0 1 2 [--out bench/world_rounds.json] [extra overrides ...]
    python bench/world_rounds.py --runs runs/rounds-s0 runs/rounds-s1
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

ROOT = Path(__file__).resolve().parent.parent


def z(a: dict, b: dict) -> float:
    se = math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2)
    return (a["accuracy"] - b["accuracy"]) / se if se > 0 else 0.0


def run_seed(seed: int, run_root: Path, extra: list[str]) -> Path:
    run_dir = run_root / f"seed-{seed}"
    cmd = [sys.executable, "-m", "r1v.cli", "run", str(ROOT / "workflows" / "tiny.yaml"), f"seed={seed}",
           f"run_root={run_root}", *extra, "--run-dir", str(run_dir)]  # overrides before options: argparse
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    """sft, round1_sft, ..., grpo rows of RUN/results.json, in workflow order."""
    res = json.loads((run_dir / "results.json").read_text())
    return [r for r in res["stages"] if r["stage"] == "sft" or r["stage"].startswith("round") or r["stage"] == "grpo"]


def report(runs: list[Path]) -> dict:
    per_run = {str(r): rows(r) for r in runs}
    for run, rs in per_run.items():
        print(f"\n{run}")
        prev = None
        for r in rs:
            corpus = (f"{r['corpus_rows']} ({r['corpus_by_score']} + {r['corpus_as_errors']} err)"
                      if r.get("corpus_by_score") is not None else str(r.get("corpus_rows", "-")))
            step = f"{z(r, prev):+.1f} SE" if prev else ""
            print(f"  {r['stage']:<12} {r['accuracy']:.3f} ± {r['stderr']:.3f}  corpus {corpus:<22} {step}")
            prev = r
    names = [r["stage"] for r in next(iter(per_run.values()))]
    summary = {}
    print("\nover runs: mean accuracy, standard deviation across runs (the spread)")
    for name in names:
        accs = [next(r["accuracy"] for r in rs if r["stage"] == name) for rs in per_run.values()]
        sd = statistics.stdev(accs) if len(accs) > 1 else None
        summary[name] = {"accuracies": accs, "mean": statistics.mean(accs), "sd": sd}
        print(f"  {name:<12} {statistics.mean(accs):.3f}  sd {sd:.3f}" if sd is not None else
              f"  {name:<12} {accs[0]:.3f}")
    return {"runs": per_run, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, nargs="*", help="finished run directories to read instead of running")
    ap.add_argument("--run-root", type=Path, default=ROOT / "runs" / "bench-rounds")
    ap.add_argument("--out", type=Path)
    args, extra = ap.parse_known_args()
    runs = args.runs or [run_seed(s, args.run_root, extra) for s in args.seeds]
    out = report(runs)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
