"""The `score` stage's work: every row through a scorer, a new corpus with the score column, the rest quarantined.

Counts reconcile: rows in = rows scored + rows quarantined (by reason). Each input file is one part of the
output (`r1v.data.parts`), so a stage that fails (a judge going down for good) resumes at the first part not
done.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from r1v.core.fs import atomic_write_json
from r1v.core.judges import SCORERS
from r1v.data.parts import PART, check_fraction, merge_quarantine, run_parts, write_scored_part
from r1v.data.reader import corpus_files
from r1v.judges.base import OUT_OF_RANGE, Verdict
from r1v.rounds.config import ScoreConfig

EARLY_CHECK_ROWS = 256  # rows scored before the quarantine fraction may stop the stage early


def check_range(v: Verdict, low: float, high: float) -> Verdict:
    if v.score is None:
        return v
    if not (math.isfinite(v.score) and low <= v.score <= high):
        return Verdict.fail(OUT_OF_RANGE, f"score {v.score} outside [{low}, {high}]")
    return v


def score_file(scorer: Any, c: ScoreConfig, file: Path, out: Path, qout: Path, seen: list[int]) -> None:
    """Score one input file into `out` (+ its quarantine `qout`); `seen` = [rows, quarantined] of this attempt."""
    if c.column in pq.ParquetFile(file).schema_arrow.names:
        raise ValueError(f"column: {file} already has a column {c.column!r}; name the new one differently")

    def score_batch(rows: list[dict[str, Any]]) -> list[Any]:
        verdicts = [check_range(v, c.min_score, c.max_score) for v in scorer.score(rows)]
        if len(verdicts) != len(rows):
            raise RuntimeError(f"scorer {c.scorer.kind} returned {len(verdicts)} verdicts for {len(rows)} rows")
        return [{c.column: v.score} if v.score is not None else v for v in verdicts]

    def after_batch(rows: int, refused: int) -> None:
        seen[0] += rows
        seen[1] += refused
        if seen[0] >= EARLY_CHECK_ROWS:
            check_fraction(seen[1], seen[0], c.max_quarantined_fraction, f"stopped early in {file.name}")

    write_scored_part(file, out, qout, c.batch_rows, [c.column], score_batch, after_batch)


def score_corpus(c: ScoreConfig, stage_dir: Path, log: Any) -> dict[str, Any]:
    """Score `c.corpus` into `stage_dir/corpus`; returns the outputs and the summary."""
    stage_dir = Path(stage_dir)
    target = stage_dir / "corpus"
    work = stage_dir / "work"
    files = corpus_files(c.corpus)
    scorer = SCORERS.get(c.scorer.kind)(c.scorer, c.min_score, c.max_score)
    seen = [0, 0]

    def produce(todo: set[int]) -> None:
        with scorer:
            for i in sorted(todo):
                f = files[i]
                score_file(scorer, c, f, work / PART.format(i), work / f"quarantine-{i:05d}.parquet", seen)
                print(f"[score] {f.name}: {seen[0]} rows scored this attempt, {seen[1]} quarantined", flush=True)

    run_parts(work, target, range(len(files)), produce)
    quarantine = merge_quarantine(work, stage_dir / "quarantine.parquet")
    summary = summarize_scores(c, files, target, quarantine, scorer.stats())
    check_fraction(summary["quarantined"], summary["rows_in"], c.max_quarantined_fraction, "over the corpus")
    atomic_write_json(stage_dir / "summary.json", summary)
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({f"quarantined_{k}": v for k, v in summary["quarantine_reasons"].items()})
    metrics.update({f"rows_score_{k}": v for k, v in summary["histogram"].items()})
    metrics.update(summary["scorer_stats"])
    log.metrics(metrics, 0)
    log.dict(summary, "score_summary.json")
    if quarantine.num_rows:
        log.table_rows(quarantine.slice(0, 200).to_pylist(), "quarantine_sample.jsonl")
    return {**summary, "corpus": target, "quarantine": stage_dir / "quarantine.parquet",
            "summary": stage_dir / "summary.json"}


def summarize_scores(c: ScoreConfig, files: list[Path], target: Path, quarantine: pa.Table,
              stats: dict[str, float]) -> dict[str, Any]:
    """Counts from the files written (so a resumed stage reports the whole corpus), checked to reconcile."""
    rows_in = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    scores = pq.read_table(target, columns=[c.column]).column(c.column)
    reasons = Counter(quarantine.column("reason").to_pylist())
    n = len(scores)
    if rows_in != n + quarantine.num_rows:
        raise RuntimeError(f"counts do not reconcile: {rows_in} rows in, {n} scored + {quarantine.num_rows} "
                           "quarantined")
    buckets = Counter(int(math.floor(s)) for s in scores.to_pylist())
    return {"rows_in": rows_in, "rows_scored": n, "quarantined": quarantine.num_rows,
            "quarantine_reasons": dict(sorted(reasons.items())), "column": c.column, "scorer": c.scorer.kind,
            "mean_score": pc.mean(scores).as_py() if n else None,
            "histogram": {str(k): buckets[k] for k in sorted(buckets)}, "scorer_stats": stats}
