"""Transfer as the paper claims it, measured with no training: does the reasoning LLM, given the projector aligned
on its substitute (re-assembly), see the image, and does it reason on what it sees?

Per seed S (by default 10, 11, 12: seeds no choice of the world or the recipe has seen):
  1. base: `r1v run workflows/tiny.yaml seed=S --only data models align reassemble sft` on the world given
     (reused when it is finished: `--run-root runs/bench-distill` shares bench/world_distill.py's base runs).
  2. probes: one workflow of greedy `eval` stages (r1v/world/probes.py says what each figure is):
     - perception: the substitute VLM (its aligned projector on the instruct LLM), the re-assembled VLM and the
       Stage-1 SFT VLM asked `Transcribe the grid.` about each test image, shown its own image, another item's
       image (shuffled) and a blank one;
     - the task (the test split's questions) for the three VLMs, and for the re-assembled VLM with shuffled and
       blank images; the two LLMs on the text form (the digits written out: the ceiling).

Prints per seed, per VLM: the per-cell read rate (own, shuffled and blank images; each letter's first mention,
and the answer box alone), the share of the substitute's
read rate that re-assembly keeps, the reads in the task chains, task accuracy, and accuracy on the items whose used
cells were all read correctly (by the probe; by the chain) against the rest, and the text ceiling (the reasoning
LLM with the digits written out) on those same items: reads select easier items (fewer cells), so that is the
matched comparison; then mean ± standard error of the seed figures. `--json` keeps every figure.

    python bench/world_transfer.py [--world runs/world-overthink --overthink] [--seeds 10 11 12] \\
        [--run-root runs/bench-transfer] [--json out.json]
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

VLMS = {"substitute": ("align", "model"), "reassemble": ("reassemble", "model"), "sft": ("sft", "model")}
MODES = {"own": "vlm", "shuffled": "shuffled_image", "blank": "no_image"}
REASONING = ("reassemble", "sft")  # VLMs on the reasoning LLM: their task answers carry a chain with its reads


def write_probe_corpus(test: str, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1v.world.probes import perception_rows

    table = pq.read_table(test)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(perception_rows(table.to_pylist()), schema=table.schema),
                   out / "part-00000.parquet")
    return out


def run_seed(seed: int, args: argparse.Namespace) -> Path:
    """The seed's base run (reused when finished) and its probes run; returns the probes run directory."""
    root = args.run_root / f"seed-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    base, probes = root / "base", root / "probes"
    print(f"seed {seed}:", flush=True)
    base_run(base, seed, args)
    data, models = outputs(base, "data"), outputs(base, "models")
    corpus = write_probe_corpus(data["test"], root / "probe-corpus")
    ev = {**yaml.safe_load(TINY.read_text())["stages"]["eval_sft"]["config"], "report_stage": None,
          "corpus": data["test"], "greedy": True}
    ev["sampling"] = {**ev["sampling"], "max_new_tokens": args.max_new_tokens}
    stages: dict[str, Any] = {}
    for vlm, (stage, key) in VLMS.items():
        model = outputs(base, stage)[key]
        for tag, mode in MODES.items():
            stages[f"probe_{vlm}_{tag}"] = {"kind": "eval", "config": {**ev, "model": model, "corpus": str(corpus),
                                                                       "mode": mode}}
        stages[f"task_{vlm}_own"] = {"kind": "eval", "config": {**ev, "model": model}}
    for tag in ("shuffled", "blank"):
        stages[f"task_reassemble_{tag}"] = {"kind": "eval", "config": {
            **ev, "model": outputs(base, "reassemble")["model"], "mode": MODES[tag]}}
    for name, llm in (("text_reasoning", models["llm"]), ("text_instruct", models["instruct_llm"])):
        stages[name] = {"kind": "eval", "config": {**ev, "model": llm, "mode": "text"}}
    wf = root / "probes.yaml"
    wf.write_text(yaml.safe_dump({"name": "transfer-probes", "run_root": str(root), "seed": seed,
                                  "tracking": {"experiment": "r1v-transfer-bench"}, "ray": {"num_cpus": 2},
                                  "stages": stages}, sort_keys=False))
    if (probes / "run.json").exists():
        r1v("resume", str(probes))
    else:
        r1v("run", str(wf), "--run-dir", str(probes))
    return probes


def preds(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(outputs(run_dir, stage)["predictions"]).read_text().splitlines()]


def seed_figures(probes: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from r1v.world import probes as pr
    from r1v.world.domain import LETTERS

    base = probes.parent / "base"
    rows = pq.read_table(outputs(base, "data")["test"], columns=["id", "meta"]).to_pylist()
    metas = {r["id"]: json.loads(r["meta"]) for r in rows}
    digits = {i: tuple(int(c) for c in m["digits"]) for i, m in metas.items()}
    used = {i: list(dict.fromkeys(t for t in m["expr"].split() if t in LETTERS)) for i, m in metas.items()}
    fig: dict[str, Any] = {"vlms": {}, "controls": {}, "text": {}}
    text = preds(probes, "text_reasoning")  # the ceiling on the very items a VLM read: a matched comparison
    for vlm in VLMS:
        task = preds(probes, f"task_{vlm}_own")
        own = preds(probes, f"probe_{vlm}_own")
        f: dict[str, Any] = {"read": {tag: pr.read_rate(preds(probes, f"probe_{vlm}_{tag}"), digits)
                                      for tag in MODES},
                             "read_boxed": pr.read_rate(own, digits, reader=pr.boxed_cells),
                             "read_used": pr.read_rate(own, digits, letters=used),
                             "task": pr.accuracy(task),
                             "given_probe": pr.given_perception(task, pr.perceived(own, digits, used))}
        f["text_given_probe"] = pr.given_perception(text, pr.perceived(own, digits, used))
        if vlm in REASONING:
            chain_seen = pr.perceived(task, digits, used, reader=pr.chain_reads)
            f["chain_reads"] = pr.read_rate(task, digits, letters=used, reader=pr.chain_reads)
            f["given_chain"] = pr.given_perception(task, chain_seen)
            f["text_given_chain"] = pr.given_perception(text, chain_seen)
        fig["vlms"][vlm] = f
    sub = fig["vlms"]["substitute"]["read"]["own"]["rate"]
    fig["share_kept"] = fig["vlms"]["reassemble"]["read"]["own"]["rate"] / sub if sub else math.nan
    for tag in ("shuffled", "blank"):
        fig["controls"][f"reassemble_{tag}"] = pr.accuracy(preds(probes, f"task_reassemble_{tag}"))
    for name in ("text_reasoning", "text_instruct"):
        fig["text"][name] = pr.accuracy(preds(probes, name))
    return fig


def mean_se(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3f}" if xs else "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.3f}"


ROWS: list[tuple[str, Any]] = [
    ("read rate, own image", lambda f: f["read"]["own"]["rate"]),
    ("read rate, shuffled image", lambda f: f["read"]["shuffled"]["rate"]),
    ("read rate, blank image", lambda f: f["read"]["blank"]["rate"]),
    ("all 4 cells read", lambda f: f["read"]["own"]["exact"]),
    ("read rate, answer box only", lambda f: f["read_boxed"]["rate"]),
    ("read rate, used cells", lambda f: f["read_used"]["rate"]),
    ("reads in the task chain", lambda f: f["chain_reads"]["rate"] if "chain_reads" in f else None),
    ("task accuracy", lambda f: f["task"]["accuracy"]),
    ("accuracy | probe read all", lambda f: f["given_probe"]["read"]["accuracy"]),
    ("  items", lambda f: f["given_probe"]["read"]["n"]),
    ("  text ceiling, same items", lambda f: f["text_given_probe"]["read"]["accuracy"]),
    ("accuracy | probe missed one", lambda f: f["given_probe"]["missed"]["accuracy"]),
    ("accuracy | chain read all", lambda f: f["given_chain"]["read"]["accuracy"] if "given_chain" in f else None),
    ("  items", lambda f: f["given_chain"]["read"]["n"] if "given_chain" in f else None),
    ("  text ceiling, same items", lambda f: f["text_given_chain"]["read"]["accuracy"] if "given_chain" in f
     else None),
    ("accuracy | chain misread one", lambda f: f["given_chain"]["missed"]["accuracy"] if "given_chain" in f
     else None),
]


def report(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for s, fig in per_seed.items():
        print(f"\nseed {s}" + "".join(f"{v:>14}" for v in VLMS))
        for label, get in ROWS:
            vals = [get(fig["vlms"][v]) for v in VLMS]
            print(f"  {label:<30}" + "".join(f"{'-':>14}" if x is None else f"{x:>14.3f}" if isinstance(x, float)
                                            else f"{x:>14}" for x in vals))
        c, t = fig["controls"], fig["text"]
        print(f"  share of the substitute's read rate kept by re-assembly: {fig['share_kept']:.3f}")
        print(f"  re-assembled VLM task accuracy: shuffled {c['reassemble_shuffled']['accuracy']:.3f}, blank "
              f"{c['reassemble_blank']['accuracy']:.3f}; text: reasoning LLM {t['text_reasoning']['accuracy']:.3f}, "
              f"instruct LLM {t['text_instruct']['accuracy']:.3f}")
    print(f"\nover seeds {' '.join(map(str, per_seed))} (mean ± standard error of the seed figures)")
    for label, get in ROWS:
        cells = []
        for v in VLMS:
            xs = [get(f["vlms"][v]) for f in per_seed.values()]
            xs = [float(x) for x in xs if x is not None]
            summary.setdefault(v, {})[label.strip()] = xs
            cells.append(mean_se(xs))
        print(f"  {label:<30}" + "".join(f"{x:>18}" for x in cells))
    extra = {"share kept": [f["share_kept"] for f in per_seed.values()],
             "reassemble task, shuffled": [f["controls"]["reassemble_shuffled"]["accuracy"] for f in per_seed.values()],
             "reassemble task, blank": [f["controls"]["reassemble_blank"]["accuracy"] for f in per_seed.values()],
             "text reasoning": [f["text"]["text_reasoning"]["accuracy"] for f in per_seed.values()],
             "text instruct": [f["text"]["text_instruct"]["accuracy"] for f in per_seed.values()]}
    for k, xs in extra.items():
        print(f"  {k:<30}{mean_se(xs):>18}")
    summary["other"] = extra
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_args(ap, ROOT / "runs" / "bench-transfer", "generation budget of every probe")
    args = parse_world_args(ap)
    per_seed = {}
    for s in args.seeds:
        t0 = time.time()
        probes = args.run_root / f"seed-{s}" / "probes" if args.runs_only else run_seed(s, args)
        per_seed[s] = seed_figures(probes)
        if not args.runs_only:
            print(f"seed {s}: {time.time() - t0:.0f} s", flush=True)
    summary = report(per_seed)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seeds": per_seed,
                                         "summary": summary}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
