"""Corpus versions written part by part, so that a long stage resumes where it stopped.

`run_parts` is the skeleton of every stage that writes a corpus this way (`score`, `generate`, `distill.score`,
`distill`): it writes the parts into `STAGE/work/` (each part file atomically: temp name, then rename; the part is
written last, after its quarantine, so its presence means "done") and, when every part is there, renames the
folder to its output name in one step. A resumed attempt skips the parts already there. Output corpora keep the
input's columns (extra score columns included) and add their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.data.reader import corpus_files
from r1v.data.schema import QUARANTINE_SCHEMA

ROW_GROUP_ROWS = 64  # the reader's unit of parallelism (r1v.data.schema.write_corpus)
PART = "part-{:05d}.parquet"


class TooManyQuarantined(RuntimeError):
    """More rows were quarantined than the stage allows: a judge that is down or misconfigured, or a broken corpus,
    stops the stage instead of leaving a corpus with a hole in it."""


def check_fraction(bad: int, seen: int, limit: float, where: str) -> None:
    """TooManyQuarantined when more than `limit` of the `seen` rows were quarantined."""
    if seen and bad / seen > limit:
        raise TooManyQuarantined(
            f"{bad} of {seen} rows quarantined ({bad / seen:.0%}), more than max_quarantined_fraction "
            f"{limit:.0%}: {where}. Is the judge reachable and configured right? See the quarantine reasons.")


def run_parts(work: Path, target: Path, keys: Iterable[int], produce: Callable[[set[int]], None], *,
              marker: str = PART, finish: Callable[[], None] | None = None,
              also: tuple[tuple[Path, str], ...] = ()) -> Path:
    """Write a corpus in resumable parts and publish it as `target`; returns `target`.

    `produce(todo)` writes, for each key in `todo` (the keys whose `marker` file is not in `work` yet), that key's
    side files (quarantine, counts, ...) and then its marker file, last. It is called once, so it opens its
    resources (engines, judges) once, and not at all when nothing is left to do. `finish()` runs after every key
    is done (a second pass, the empty corpus's empty part). `also` publishes further (folder, file pattern) pairs
    before `target`. A stage resumed after publishing does nothing here.
    """
    if target.exists():
        return target
    todo = {k for k in keys if not (work / marker.format(k)).exists()}
    if todo:
        produce(todo)
    if finish is not None:
        finish()
    for folder, pattern in also:
        publish(work, folder, pattern)
    return publish(work, target)


def write_table(table: pa.Table, path: Path) -> None:
    """`table` as one Parquet file, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    os.replace(tmp, path)


def write_scored_part(file: Path, out: Path, qout: Path, batch_rows: int, columns: list[str],
                      score_batch: Callable[[list[dict[str, Any]]], list[Any]],
                      after_batch: Callable[[int, int], None] | None = None) -> None:
    """One input file's rows with new float `columns` into the part `out`, the refused rows into `qout`.

    `score_batch(rows)` returns per row a dict of the new columns' values, or a refusal with `reason` and
    `detail` (a `Verdict`), which quarantines the row. `after_batch(rows, refused)` may raise to stop early.
    The part is written under a temp name and renamed last, after its quarantine: its presence means done.
    """
    pf = pq.ParquetFile(file)
    schema = pf.schema_arrow
    out_schema = schema
    for name in columns:
        out_schema = out_schema.append(pa.field(name, pa.float64()))
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(tmp, out_schema)
    bad: list[dict[str, Any]] = []
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch], schema=schema)
            rows = table.to_pylist()
            res = score_batch(rows)
            if len(res) != len(rows):
                raise RuntimeError(f"{len(res)} results for {len(rows)} rows of {file}")
            keep = [isinstance(o, dict) for o in res]
            bad += [{"id": r.get("id"), "reason": o.reason, "detail": o.detail, "source": r.get("source")}
                    for r, o in zip(rows, res, strict=True) if not isinstance(o, dict)]
            kept = table.filter(pa.array(keep, pa.bool_()))
            good = [o for o in res if isinstance(o, dict)]
            for name in columns:
                kept = kept.append_column(name, pa.array([o[name] for o in good], pa.float64()))
            writer.write_table(kept, row_group_size=ROW_GROUP_ROWS)
            if after_batch is not None:
                after_batch(len(rows), len(rows) - sum(keep))
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    write_table(quarantine_table(bad), qout)
    tmp.replace(out)


def quarantine_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{k: str(r.get(k) or "") for k in QUARANTINE_SCHEMA.names} for r in records],
                                schema=QUARANTINE_SCHEMA)


def merge_quarantine(work: Path, out: Path) -> pa.Table:
    """Every `quarantine-*.parquet` of `work` as one file `out` (written even when empty)."""
    tables = [pq.read_table(p) for p in sorted(work.glob("quarantine-*.parquet"))]
    table = pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()
    write_table(table, out)
    return table


def publish(work: Path, target: Path, pattern: str = "part-*.parquet") -> Path:
    """Move `work`'s files matching `pattern` into a new directory `target`, renamed in one step (nothing to do
    when `target` exists: a resumed stage that had published it)."""
    if target.exists():
        return target
    staging = work / f".{target.name}"
    staging.mkdir(parents=True, exist_ok=True)
    for p in sorted(work.glob(pattern)):
        os.replace(p, staging / p.name)
    if not any(staging.iterdir()):
        raise RuntimeError(f"{work}: no {pattern} to publish")
    os.replace(staging, target)
    return target


def iter_chunks(corpus: str | Path, rows: int, columns: list[str] | None = None
                ) -> Iterator[tuple[int, int, pa.Table]]:
    """(chunk index, rows before it, table) over the corpus's files in order, `rows` rows at most per chunk;
    chunks never span files, so the same corpus always gives the same chunks."""
    k = offset = 0
    for f in corpus_files(corpus):
        pf = pq.ParquetFile(f)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        for batch in pf.iter_batches(batch_size=rows, columns=cols):
            yield k, offset, pa.Table.from_batches([batch])
            k += 1
            offset += batch.num_rows


def corpus_schema(corpus: str | Path) -> pa.Schema:
    """The schema of the corpus's first part file."""
    return pq.ParquetFile(corpus_files(corpus)[0]).schema_arrow
