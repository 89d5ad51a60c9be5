"""Does QDAM's image score carry information in a world whose images vary in clarity (`data.world`'s `clarity`)?

Per seed S (by default 40, 41, 42: seeds no choice of the world or the recipe has seen):
  1. base: `r1v run workflows/tiny.yaml seed=S stages.data.config.clarity={} --only data models align reassemble
     sft` (every corpus's images blurred by a radius drawn per row from 0, 0.6, 1.2 pixels; the alignment rows too).
  2. score: `distill.score` on the SFT corpus (the cues of `r1v/distill/cues.py`, no judge): `s_v` and its
     normalised form by blur radius, and its rank correlation with the radius.
  3. probes: greedy `eval` stages on the test split: the substitute, re-assembled and Stage-1 SFT VLMs asked
     `Transcribe the grid.` (the per-cell read rate, `r1v/world/probes.py`), and the SFT VLM's task accuracy,
     each by blur radius.

What it shows: whether the image score separates the rows by clarity (QDAM's `s_v` not a constant column) and
whether a blurrier image is harder for the VLMs to read and reason on (so a low `s_v` marks a harder image).
Prints per seed and over seeds (mean ± standard error of the seed figures). `--json` keeps every figure.

    python bench/world_clarity.py [--seeds 40 41 42] [--run-root runs/bench-clarity] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from world_runs import ROOT, TINY, add_world_args, base_run, outputs, parse_world_args, r1v
from world_transfer import preds, write_probe_corpus

VLMS = {"substitute": "align", "reassemble": "reassemble", "sft": "sft"}


def run_seed(seed: int, args: argparse.Namespace) -> Path:
    """The seed's base run, scoring and probes (each reused when finished); returns the seed's directory."""
    root = args.run_root / f"seed-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    print(f"seed {seed}:", flush=True)
    base = base_run(root / "base", seed, args)
    data = outputs(base, "data")
    corpus = write_probe_corpus(data["test"], root / "probe-corpus")
    ev = {**yaml.safe_load(TINY.read_text())["stages"]["eval_sft"]["config"], "report_stage": None,
          "corpus": data["test"], "greedy": True}
    ev["sampling"] = {**ev["sampling"], "max_new_tokens": args.max_new_tokens}
    stages: dict[str, Any] = {"score": {"kind": "distill.score", "config": {"corpus": data["sft"]}}}
    for vlm, stage in VLMS.items():
        stages[f"probe_{vlm}"] = {"kind": "eval", "config": {**ev, "model": outputs(base, stage)["model"],
                                                             "corpus": str(corpus)}}
    stages["task_sft"] = {"kind": "eval", "config": {**ev, "model": outputs(base, "sft")["model"]}}
    wf = root / "clarity.yaml"
    wf.write_text(yaml.safe_dump({"name": "clarity-probes", "run_root": str(root), "seed": seed,
                                  "tracking": {"experiment": "r1v-clarity-bench"}, "ray": {"num_cpus": 2},
                                  "stages": stages}, sort_keys=False))
    probes = root / "probes"
    if (probes / "run.json").exists():
        r1v("resume", str(probes))
    else:
        r1v("run", str(wf), "--run-dir", str(probes))
    return root


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def seed_figures(root: Path) -> dict[str, Any]:
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from r1v.world import probes as pr

    base, probes = root / "base", root / "probes"
    scored = pads.dataset(outputs(probes, "score")["corpus"]).to_table(
        columns=["meta", "s_v", "s_v_norm", "s_t", "s_i", "penalty"]).to_pylist()
    blur = [json.loads(r["meta"])["blur"] for r in scored]
    radii = sorted(set(blur))
    def spread(k: str) -> float:
        return max(r[k] for r in scored) - min(r[k] for r in scored)

    rho = spearman(blur, [r["s_v"] for r in scored])
    fig: dict[str, Any] = {"score": {"rows": len(scored), "spearman_blur_s_v": rho,
                                     "s_t_spread": spread("s_t"), "s_i_spread": spread("s_i"), "by_blur": {}}}
    for b in radii:
        rs = [r for r, x in zip(scored, blur, strict=True) if x == b]
        fig["score"]["by_blur"][str(b)] = {
            "n": len(rs), "s_v_min": min(r["s_v"] for r in rs), "s_v_max": max(r["s_v"] for r in rs),
            "s_v_norm": statistics.mean(r["s_v_norm"] for r in rs),
            "penalty": statistics.mean(r["penalty"] for r in rs)}
    metas = {r["id"]: json.loads(r["meta"]) for r in pq.read_table(outputs(base, "data")["test"],
                                                                   columns=["id", "meta"]).to_pylist()}
    digits = {i: tuple(int(c) for c in m["digits"]) for i, m in metas.items()}
    fig["read"], fig["task_sft"] = {}, {}
    for b in radii:
        ids = {i for i, m in metas.items() if m["blur"] == b}
        fig["read"][str(b)] = {vlm: pr.read_rate([p for p in preds(probes, f"probe_{vlm}") if p["id"] in ids],
                                                 digits) for vlm in VLMS}
        fig["task_sft"][str(b)] = pr.accuracy([p for p in preds(probes, "task_sft") if p["id"] in ids])
    return fig


def mean_se(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.3f}"


def report(per_seed: dict[int, dict[str, Any]]) -> None:
    for s, f in per_seed.items():
        sc = f["score"]
        print(f"seed {s}: {sc['rows']} SFT rows scored; Spearman(blur, s_v) {sc['spearman_blur_s_v']:.3f}; "
              f"spread of s_t {sc['s_t_spread']:.3f}, of s_i {sc['s_i_spread']:.3f}")
        for b, v in sc["by_blur"].items():
            reads = ", ".join(f"{vlm} {f['read'][b][vlm]['rate']:.3f}" for vlm in VLMS)
            t = f["task_sft"][b]
            print(f"  blur {b}: {v['n']} rows, s_v {v['s_v_min']:.3f}-{v['s_v_max']:.3f} (normalised "
                  f"{v['s_v_norm']:.3f}), penalty {v['penalty']:.3f}; read rate {reads}; SFT task "
                  f"{t['accuracy']:.3f} ± {t['stderr']:.3f} (n {t['n']})")
    seeds = list(per_seed.values())
    print(f"over seeds {list(per_seed)}: Spearman(blur, s_v) "
          f"{mean_se([f['score']['spearman_blur_s_v'] for f in seeds])}")
    for b in seeds[0]["score"]["by_blur"]:
        reads = ", ".join(f"{vlm} {mean_se([f['read'][b][vlm]['rate'] for f in seeds])}" for vlm in VLMS)
        print(f"  blur {b}: s_v_norm {mean_se([f['score']['by_blur'][b]['s_v_norm'] for f in seeds])}; read "
              f"rate {reads}; SFT task {mean_se([f['task_sft'][b]['accuracy'] for f in seeds])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(ap, ROOT / "runs" / "bench-clarity", "generation budget of every probe")
    ap.set_defaults(seeds=[40, 41, 42], clarity=True)
    args = parse_world_args(ap)
    per_seed = {}
    for s in args.seeds:
        t0 = time.time()
        root = args.run_root / f"seed-{s}" if args.runs_only else run_seed(s, args)
        per_seed[s] = seed_figures(root)
        if not args.runs_only:
            print(f"seed {s}: {time.time() - t0:.0f} s", flush=True)
    report(per_seed)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seeds": per_seed},
                                        indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
