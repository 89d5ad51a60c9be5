"""The miniature world's recipe over several seeds: does every stage do what the paper's table says?

Runs `r1v run workflows/tiny.yaml seed=N` for each seed (each a full demo run, a few minutes on 2 cores),
reads each RUN/results.json and prints, per seed, the results table and the recipe's checks:
  - SFT beats re-assembly and GRPO beats SFT, each by more than 2 standard errors (greedy accuracy);
  - the reasoning LLM beats the instruct LLM on text;
  - re-assembly (no multimodal reasoning data) beats the no-image and shuffled-image baselines and the substitute
    VLM by > 3 SE.
A difference's standard error is sqrt(se_a^2 + se_b^2) (independent samples of the same test items: a
conservative choice, the paired one would be smaller).

    python bench/world_recipe.py --seeds 0 1 2 [--out bench/world_recipe.json] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def z(a: dict, b: dict) -> float:
    """(a - b) in standard errors of the difference."""
    se = math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2)
    return (a["accuracy"] - b["accuracy"]) / se if se > 0 else float("inf") * (a["accuracy"] - b["accuracy"])


def checks(res: dict) -> list[tuple[str, float, float, bool]]:
    st = {s["stage"]: s for s in res["stages"]}
    b = res["baselines"]
    rows = [("sft > reassemble", z(st["sft"], st["reassemble"]), 2.0),
            ("grpo > sft", z(st["grpo"], st["sft"]), 2.0)]
    # With iterative SFT rounds between them, "grpo > sft" spans the rounds too: GRPO's own effect is over the
    # model it started from, the last round's.
    last = [k for k in st if k.startswith("round")]
    if last:
        rows.append((f"grpo > {last[-1]}", z(st["grpo"], st[last[-1]]), 2.0))
    rows += [("text: reasoning > instruct", z(b["text_reasoning"], b["text_instruct"]), 2.0),
             ("reassemble > no_image", z(st["reassemble"], b["no_image"]), 3.0)]
    if "shuffled_image" in b:  # an in-distribution image that does not answer the question
        rows.append(("reassemble > shuffled_image", z(st["reassemble"], b["shuffled_image"]), 3.0))
    rows.append(("reassemble > substitute_vlm", z(st["reassemble"], b["substitute_vlm"]), 3.0))
    return [(name, zz, need, zz > need) for name, zz, need in rows]


def run_seed(seed: int, run_root: Path, extra: list[str]) -> dict:
    run_dir = run_root / f"seed-{seed}"
    cmd = [sys.executable, "-m", "r1v.cli", "run", str(ROOT / "workflows" / "tiny.yaml"), f"seed={seed}",
           f"run_root={run_root}", *extra, "--run-dir", str(run_dir)]  # overrides before options: argparse
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads((run_dir / "results.json").read_text())
    res["seconds"] = round(time.time() - t0, 1)
    res["run_dir"] = str(run_dir)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--run-root", default=str(ROOT / "runs" / "bench-world"))
    ap.add_argument("--out", default=None, help="write all seeds' results and checks as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra workflow overrides for every seed")
    args = ap.parse_args()
    from r1v.eval.results import format_table

    all_res = {}
    for seed in args.seeds:
        res = run_seed(seed, Path(args.run_root), args.overrides)
        all_res[seed] = res
        print(f"\n=== seed {seed} ({res['seconds']:.0f}s, {res['run_dir']})")
        print(format_table(res))
        for name, zz, need, ok in checks(res):
            print(f"  {'PASS' if ok else 'FAIL'}  {name}: {zz:+.1f} SE (needs > {need:g})")
    print("\n=== summary over seeds (greedy accuracy)")
    names = [s["stage"] for s in next(iter(all_res.values()))["stages"]]
    for name in names:
        accs = [next(s for s in r["stages"] if s["stage"] == name)["accuracy"] for r in all_res.values()]
        print(f"  {name:<16} " + "  ".join(f"{a:.3f}" for a in accs))
    for key in next(iter(all_res.values()))["baselines"]:
        accs = [r["baselines"][key]["accuracy"] for r in all_res.values()]
        print(f"  {key:<16} " + "  ".join(f"{a:.3f}" for a in accs))
    for i, (name, *_rest) in enumerate(checks(next(iter(all_res.values())))):
        zs = [checks(r)[i][1] for r in all_res.values()]
        print(f"  {name:<30} " + "  ".join(f"{x:+.1f}" for x in zs) + " SE")
    if args.out:
        Path(args.out).write_text(json.dumps({str(k): {**v, "checks": checks(v)} for k, v in all_res.items()},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
