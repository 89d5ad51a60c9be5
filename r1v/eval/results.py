"""The results table of a run: one row per trained stage's eval and one per baseline, from the eval summaries.

Eval stages declare which row they fill (`report_stage` / `report_baseline` in EvalConfig), so the table is
assembled from the run directory alone, after the run or long after it::

    {"stages": [{"stage": "sft", "accuracy": ..., "stderr": ..., "n": ..., "pass_at_1": ...,
                 "mean_response_tokens": ...}, ...],
     "baselines": {"no_image": {...same fields}, "substitute_vlm": {...}, ...}}

`stages` is in workflow order (of the stages evaluated). Rows also carry `pass_at_1_stderr`,
`accuracy_by_level` and `eval_stage` (the eval stage that produced them); reporting eval stages without a
summary of their current config (not run, failed, or stale) are listed under `missing`, present only then.
A stage row whose stage trained on a corpus carries `corpus_rows` (its size), and when a `select` stage made
that corpus, `corpus_by_score` and `corpus_as_errors` (its counts.json): iterative SFT's rounds differ in their
corpora, and the table shows by how much.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r1v.core.fs import atomic_write_json, atomic_write_text, read_json
from r1v.core.storage import exists, stage_local
from r1v.eval.config import EvalConfig
from r1v.workflow.refs import REF
from r1v.workflow.runner import Runner, topo_order
from r1v.workflow.tracking import RunLogger

FIELDS = ("accuracy", "stderr", "n", "pass_at_1", "pass_at_1_stderr", "mean_response_tokens")
CORPUS_FIELDS = ("corpus_rows", "corpus_by_score", "corpus_as_errors")
TABLE_ARTIFACT = "results/table.json"


def _row(summary: dict[str, Any], eval_stage: str) -> dict[str, Any]:
    row = {k: summary.get(k) for k in FIELDS}
    if row["n"] is None:  # benchmark summaries count items, not n
        row["n"] = summary.get("items")
    row["accuracy_by_level"] = summary.get("accuracy_by_level") or {}
    row["eval_stage"] = eval_stage
    return row


def _corpus_fields(runner: Any, stage: str) -> dict[str, Any]:
    """`corpus_rows` (and select's split of it) of the corpus `stage` trained on; {} when it has none or it is
    gone. Read from Parquet footers and counts.json: no rows are loaded."""
    import pyarrow.parquet as pq


    corpus = getattr(runner.wf.stage_configs.get(stage), "corpus", None)
    if not isinstance(corpus, str):
        return {}
    m = REF.match(corpus)
    outputs = runner.state(m.group(1)).get("outputs", {}) if m else {}
    where = outputs.get(m.group(2), "") if m else corpus
    path = stage_local(where) if where and exists(where) else Path(where)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        return {}
    out: dict[str, Any] = {"corpus_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}
    counts = read_json(stage_local(outputs["counts"])) if outputs.get("counts") else None
    if isinstance(counts, dict) and isinstance(counts.get("totals"), dict):
        out["corpus_by_score"] = counts["totals"].get("kept_by_score", 0)
        out["corpus_as_errors"] = counts["totals"].get("added_as_errors", 0)
    return out


def collect(run_dir: str | Path) -> dict[str, Any]:
    """The results table from RUN/workflow.yaml (who reports what) and each eval stage's summary.json."""
    runner = Runner.open(Path(run_dir))
    order = topo_order(runner.wf)
    evals = [(n, runner.wf.stage_configs[n]) for n in order if isinstance(runner.wf.stage_configs[n], EvalConfig)]
    stages: list[tuple[int, dict[str, Any]]] = []
    baselines: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for name, c in evals:
        if not (c.report_stage or c.report_baseline):
            continue
        state = runner.state(name)
        current = runner.is_current(name, upstream=False)  # the table reports what this config's evals wrote
        path = state.get("outputs", {}).get("summary") if current else None  # a stale summary is not this run's
        summary = read_json(stage_local(path)) if path else None
        if summary is None:
            missing.append(name)
            continue
        if c.report_stage:
            stages.append((order.index(c.report_stage), {"stage": c.report_stage, **_row(summary, name),
                                                          **_corpus_fields(runner, c.report_stage)}))
        else:
            baselines[c.report_baseline] = _row(summary, name)
    out: dict[str, Any] = {"stages": [r for _, r in sorted(stages, key=lambda x: x[0])], "baselines": baselines}
    if missing:
        out["missing"] = missing
    return out


def has_roles(run_dir: str | Path) -> bool:
    """Whether any eval stage of the run declares a results-table row."""
    wf = Runner.open(Path(run_dir)).wf
    return any(isinstance(c, EvalConfig) and (c.report_stage or c.report_baseline) for c in wf.stage_configs.values())


def write(run_dir: str | Path, results: dict[str, Any] | None = None) -> Path:
    """RUN/results.json, written atomically."""
    path = Path(run_dir) / "results.json"
    atomic_write_json(path, results if results is not None else collect(run_dir))
    return path


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return ([(r["stage"], r) for r in results.get("stages", [])]
            + [(f"baseline: {k}", r) for k, r in results.get("baselines", {}).items()])


def _corpus_cell(r: dict[str, Any]) -> str:
    if r.get("corpus_rows") is None:
        return "-"
    if r.get("corpus_by_score") is None:
        return str(r["corpus_rows"])
    return f"{r['corpus_rows']} ({r['corpus_by_score']} + {r['corpus_as_errors']} err)"


def _pm(value: float | None, err: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ± {err:.3f}" if err is not None else f"{value:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """A console table: stages, then baselines; accuracy ± stderr, pass@1 ± stderr, n, mean response tokens, and
    the rows of the corpus a stage trained on (`score + errors` when a select stage made it), when any has one."""
    head: tuple[str, ...] = ("row", "accuracy", "pass@1", "n", "mean tokens")
    body: list[tuple[str, ...]] = [
        (name, _pm(r.get("accuracy"), r.get("stderr")), _pm(r.get("pass_at_1"), r.get("pass_at_1_stderr")),
         str(r.get("n") if r.get("n") is not None else "-"),
         f"{r['mean_response_tokens']:.1f}" if r.get("mean_response_tokens") is not None else "-")
        for name, r in _rows(results)]
    if any(r.get("corpus_rows") is not None for _, r in _rows(results)):
        head = (*head, "corpus rows")
        body = [(*b, _corpus_cell(r)) for b, (_, r) in zip(body, _rows(results), strict=True)]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                              strict=True)))

    rule = "-" * len(line(head))
    out = [line(head), rule, *(line(b) for b in body)]
    if results.get("missing"):
        out.append(f"(no summary yet from: {', '.join(results['missing'])})")
    return "\n".join(out)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """PNG bar chart: greedy accuracy and pass@1 per stage (solid) and per baseline (hatched), ± stderr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(results)
    names = [n.removeprefix("baseline: ") for n, _ in rows]
    n_stages = len(results.get("stages", []))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4))
    width = 0.38
    for k, (key, err, label, color) in enumerate((("accuracy", "stderr", "accuracy (greedy)", "tab:blue"),
                                                  ("pass_at_1", "pass_at_1_stderr", "pass@1", "tab:orange"))):
        for part, idx in (("", range(n_stages)), (" baseline", range(n_stages, len(rows)))):
            idx = [i for i in idx if _finite(rows[i][1].get(key))]
            if not idx:
                continue
            base = bool(part)
            ax.bar([i + (k - 0.5) * width for i in idx], [rows[i][1][key] for i in idx], width,
                   yerr=[rows[i][1].get(err) or 0.0 for i in idx], capsize=3, color=color, edgecolor=color,
                   alpha=0.4 if base else 0.9, hatch="//" if base else None, label=label + part)
    if 0 < n_stages < len(rows):
        ax.axvline(n_stages - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("stages (solid) and baselines (hatched), ± standard error")
    if rows:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_results(run_dir: str | Path, results: dict[str, Any], files: list[Path]) -> None:
    """Metrics `results/<stage>/<field>` and `results/baseline/<name>/<field>`, the files, and the table as an
    MLflow table (`results/table.json`, replaced on every report) into the parent MLflow run of RUN/run.json."""
    meta = read_json(Path(run_dir) / "run.json", {}) or {}
    log = RunLogger(meta.get("tracking_uri"), meta.get("parent_run_id"))
    if not log.active:
        return
    metrics: dict[str, float] = {}
    for prefix, r in ([(f"results/{r['stage']}", r) for r in results["stages"]]
                      + [(f"results/baseline/{k}", r) for k, r in results["baselines"].items()]):
        metrics.update({f"{prefix}/{k}": r[k] for k in (*FIELDS, *CORPUS_FIELDS) if isinstance(r.get(k), int | float)})
    log.metrics(metrics, 0)
    for f in files:
        log.artifact(f, "results")
    # the table itself, for MLflow's table viewer (the parent run's artifacts: results/table.json)
    log.table([{"row": name, **{k: r.get(k) for k in (*FIELDS, *CORPUS_FIELDS)}, "eval_stage": r.get("eval_stage")}
               for name, r in _rows(results)], TABLE_ARTIFACT, replace=True)


def report(run_dir: str | Path) -> dict[str, Any] | None:
    """Collect, write RUN/results.json and RUN/results.png, log both (and the metrics) to the parent run.

    None, writing nothing, when no eval stage of the run declares a row.
    """
    if not has_roles(run_dir):
        return None
    results = collect(run_dir)
    files = [write(run_dir, results)]
    if results["stages"] or results["baselines"]:
        files.append(plot(results, Path(run_dir) / "results.png"))
    atomic_write_text(Path(run_dir) / "results.txt", format_table(results) + "\n")
    files.append(Path(run_dir) / "results.txt")
    log_results(run_dir, results, files)
    return results
