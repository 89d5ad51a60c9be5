"""AL-CoTD against its controls on the miniature world: does DRLC's per-row repetition penalty shorten easy items'
chains more than a uniform penalty of the same mean, at equal or better accuracy, after SFT on the distilled corpus?

Per seed S (by default 10, 11, 12: seeds no choice of the world or the recipe has seen):
  1. base: `r1v run workflows/tiny.yaml seed=S --only data models align reassemble sft` on the world given
     (`--world`; `--overthink` puts the world's redundant `Check:` segments in the SFT corpus, as its reasoning LLM
     was built with): the Stage-1 SFT model that distils, the re-assembled model that the arms' SFT starts from,
     the SFT corpus and the test split.
  2. score: `distill.score` on the SFT corpus (QDAM/VTIA cues, DRLC penalty per row); the uniform arms take the
     mean of its penalties.
  3. arms: per arm a `distill` stage (the base run's SFT model writes a chain per row at the arm's penalty and
     scope, sampled at 0.6 / top-p 0.95; a wrong chain is rewritten to the reference by the `rule` judge), SFT from
     the re-assembled model on the distilled corpus (tiny.yaml's Stage-1 SFT), and a greedy eval on the test split;
     `orig` trains on the undistilled corpus. Arms: `none` (penalty 1), `drlc` and `uniform` in the `generated`
     scope (the scope that works, docs/world.md), `drlc_pg` and `uniform_pg` in `prompt_and_generated` (control).

Prints per arm: corpus tokens by level before / after distillation and the rows rewritten; after SFT, greedy
accuracy and mean response tokens and `Check:` segments by level. Over seeds: mean ± standard error of the seed
means. `--json` keeps every figure, `--plot` draws tokens and accuracy by level per arm.

    python bench/world_distill.py --world runs/world-overthink --overthink [--seeds 10 11 12] \\
        [--json out.json] [--plot docs/figures/alcotd.png]
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

DISTILL_SAMPLING = {"temperature": 0.6, "top_p": 0.95}
ARMS: dict[str, dict[str, Any]] = {  # "uniform" arms: default_penalty set to the mean DRLC penalty at run time
    "none": {"penalty_column": "no_penalty", "default_penalty": 1.0, "penalty_scope": "generated"},
    "drlc": {"penalty_column": "penalty", "penalty_scope": "generated"},
    "uniform": {"penalty_column": "no_penalty", "penalty_scope": "generated"},
    "drlc_pg": {"penalty_column": "penalty", "penalty_scope": "prompt_and_generated"},
    "uniform_pg": {"penalty_column": "no_penalty", "penalty_scope": "prompt_and_generated"},
}
ORDER = ["orig", *ARMS]


def write_workflow(path: Path, name: str, stages: dict[str, Any], seed: int, run_root: Path) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "run_root": str(run_root), "seed": seed,
                                    "tracking": {"experiment": "r1v-distill-bench"}, "ray": {"num_cpus": 2},
                                    "stages": stages}, sort_keys=False))
    return path


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Path]:
    """The seed's three runs (see the module doc); an existing finished run directory is reused."""
    root = args.run_root / f"seed-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    tiny = yaml.safe_load(TINY.read_text())["stages"]
    runs = {k: root / k for k in ("base", "score", "arms")}
    print(f"seed {seed}:", flush=True)
    base_run(runs["base"], seed, args)
    data = outputs(runs["base"], "data")
    if not (runs["score"] / "stages" / "score" / "state.json").exists():
        wf = write_workflow(root / "score.yaml", "distill-score", {
            "score": {"kind": "distill.score", "config": {"corpus": data["sft"]}}}, seed, root)
        r1v("run", str(wf), "--run-dir", str(runs["score"]))
    scored = outputs(runs["score"], "score")["corpus"]
    sft_model, reassembled = outputs(runs["base"], "sft")["model"], outputs(runs["base"], "reassemble")["model"]
    sft = {**tiny["sft"]["config"], "model": reassembled}
    ev = {**tiny["eval_sft"]["config"], "corpus": data["test"], "report_stage": None,
          "sampling": {**tiny["eval_sft"]["config"]["sampling"], "max_new_tokens": args.max_new_tokens}}
    stages: dict[str, Any] = {"sft_orig": {"kind": "sft", "config": {**sft, "corpus": scored}},
                              "eval_orig": {"kind": "eval", "config": {**ev, "model": "@sft_orig.model"}}}
    for arm, pen in ARMS.items():
        pen = {"default_penalty": mean_penalty(scored), **pen}
        stages[f"distill_{arm}"] = {"kind": "distill", "config": {
            "model": sft_model, "corpus": scored, "judge": {"kind": "rule"}, **pen,
            "sampling": {**DISTILL_SAMPLING, "max_new_tokens": args.max_new_tokens}}}
        stages[f"sft_{arm}"] = {"kind": "sft", "config": {**sft, "corpus": f"@distill_{arm}.corpus"}}
        stages[f"eval_{arm}"] = {"kind": "eval", "config": {**ev, "model": f"@sft_{arm}.model"}}
    wf = write_workflow(root / "arms.yaml", "distill-arms", stages, seed, root)
    if (runs["arms"] / "run.json").exists():  # an earlier, interrupted attempt: finish it
        r1v("resume", str(runs["arms"]))
    else:
        r1v("run", str(wf), "--run-dir", str(runs["arms"]))
    return runs


def mean_penalty(scored: str) -> float:
    """The mean DRLC penalty over the scored corpus: the uniform arms' penalty."""
    import pyarrow.dataset as pads

    return float(statistics.mean(pads.dataset(scored).to_table(columns=["penalty"]).column(0).to_pylist()))


def eval_figures(predictions: Path) -> dict[str, Any]:
    """Greedy accuracy, mean response tokens and `Check:` segments per response, overall and by level."""
    rows = [r for r in map(json.loads, predictions.read_text().splitlines()) if r.get("greedy")]
    out: dict[str, Any] = {"n": len(rows)}
    for key, rs in [("all", rows), *((str(lv), [r for r in rows if r.get("level") == lv])
                                     for lv in sorted({r.get("level") for r in rows}))]:
        p = sum(r["correct"] for r in rs) / len(rs)
        out[key] = {"n": len(rs), "accuracy": p, "stderr": math.sqrt(p * (1 - p) / len(rs)),
                    "tokens": statistics.mean(r["n_tokens"] for r in rs),
                    "checks": statistics.mean(r["response"].count("Check:") for r in rs),
                    "ended": statistics.mean(bool(r.get("finished", True)) for r in rs)}
    return out


def seed_figures(runs: dict[str, Path]) -> dict[str, Any]:
    from r1v.data.pipeline import load_tokenizer
    from r1v.distill.plots import distilled_points, length_stats, reference_points

    scored = outputs(runs["score"], "score")["corpus"]
    tok = load_tokenizer(outputs(runs["base"], "sft")["model"])
    before = length_stats(reference_points(scored, tok))
    out: dict[str, Any] = {"before": before, "mean_penalty": mean_penalty(scored), "arms": {}}
    for arm in ORDER:
        fig: dict[str, Any] = {"eval": eval_figures(Path(outputs(runs["arms"], f"eval_{arm}")["predictions"]))}
        if arm != "orig":
            o = outputs(runs["arms"], f"distill_{arm}")
            summary = json.loads(Path(o["summary"]).read_text())
            fig["distill"] = {k: summary[k] for k in ("rows_in", "kept", "rewritten", "dropped")}
            fig["corpus"] = length_stats(distilled_points(o["corpus"]))
        out["arms"][arm] = fig
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def fmt(xs: list[float], digits: int = 3) -> str:
    m, se = mean_se(xs)
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def report(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = list(per_seed)
    levels = sorted(per_seed[seeds[0]]["before"]["tokens_by_level"])
    print("\nDRLC penalty by level (the `drlc` arms' rows), per seed: "
          + "; ".join(f"seed {s}: " + " / ".join(f"{v:.3f}" for v in f["before"]["penalty_by_level"].values())
                      for s, f in per_seed.items()))
    print("uniform penalty (the mean): " + ", ".join(f"{f['mean_penalty']:.3f}" for f in per_seed.values()))
    print("\ncorpus chain tokens by level 1/2/3 (mean ± se over seeds) and rows rewritten to the reference")
    print(f"  {'before':<11} " + " | ".join(fmt([f["before"]["tokens_by_level"][lv] for f in per_seed.values()], 1)
                                         for lv in levels))
    for arm in ARMS:
        fs = [f["arms"][arm] for f in per_seed.values()]
        print(f"  {arm:<11} " + " | ".join(fmt([a["corpus"]["tokens_by_level"][lv] for a in fs], 1) for lv in levels)
              + f"   rewritten {fmt([a['distill']['rewritten'] / a['distill']['rows_in'] for a in fs])}")
    print("\nafter SFT, greedy on the test split (mean ± se over seeds): accuracy all | by level 1/2/3")
    summary: dict[str, Any] = {}
    for arm in ORDER:
        es = [f["arms"][arm]["eval"] for f in per_seed.values()]
        summary[arm] = {key: {m: mean_se([e[key][m] for e in es]) for m in ("accuracy", "tokens", "checks", "ended")}
                        for key in ["all", *levels]}
        print(f"  {arm:<11} {fmt([e['all']['accuracy'] for e in es])} | "
              + " | ".join(fmt([e[lv]["accuracy"] for e in es]) for lv in levels))
    print("response tokens all | by level 1/2/3;  Check: segments per response by level 1/2/3")
    for arm in ORDER:
        es = [f["arms"][arm]["eval"] for f in per_seed.values()]
        print(f"  {arm:<11} {fmt([e['all']['tokens'] for e in es], 1)} | "
              + " | ".join(fmt([e[lv]["tokens"] for e in es], 1) for lv in levels) + ";  "
              + " | ".join(fmt([e[lv]["checks"] for e in es], 2) for lv in levels))
    print("per seed, accuracy (n) and level-1 tokens:")
    for s, f in per_seed.items():
        print(f"  seed {s}: " + ", ".join(f"{arm} {f['arms'][arm]['eval']['all']['accuracy']:.3f} "
                                          f"({f['arms'][arm]['eval']['n']}) {f['arms'][arm]['eval']['1']['tokens']:.1f}"
                                          for arm in ORDER))
    return summary


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [k for k in next(iter(summary.values())) if k != "all"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(summary)
    for i, (arm, s) in enumerate(summary.items()):
        xs = [int(lv) + (i - len(summary) / 2 + 0.5) * width for lv in levels]
        for ax, metric in zip(axes, ("tokens", "checks", "accuracy"), strict=True):
            ax.bar(xs, [s[lv][metric][0] for lv in levels], width, yerr=[s[lv][metric][1] for lv in levels],
                   label=arm, color=f"C{i}", capsize=2)
    for ax, label in zip(axes, ("response tokens", "`Check:` segments per response", "greedy accuracy"),
                         strict=True):
        ax.set_xticks([int(lv) for lv in levels], [f"level {lv}" for lv in levels])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(ap, ROOT / "runs" / "bench-distill", "distill and eval generation budget")
    ap.add_argument("--plot", type=Path)
    args = parse_world_args(ap)
    per_seed = {}
    for s in args.seeds:
        t0 = time.time()
        runs = ({k: args.run_root / f"seed-{s}" / k for k in ("base", "score", "arms")} if args.runs_only
                else run_seed(s, args))
        per_seed[s] = seed_figures(runs)
        if not args.runs_only:
            print(f"seed {s}: {time.time() - t0:.0f} s", flush=True)
    summary = report(per_seed)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seeds": per_seed,
                                         "summary": summary}, indent=1, default=str) + "\n")
    if args.plot:
        plot(summary, args.plot, f"AL-CoTD arms after SFT, seeds {' '.join(map(str, args.seeds))} "
                                 f"(mean ± se over seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
