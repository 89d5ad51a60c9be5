"""The streaming import driver: read -> validate -> write, with memory bounded whatever the input size.

Memory: one record per reader, at most `2 * workers` batches in flight, and a row buffer flushed as a
Parquet row group at `buffer_bytes` (part files roll over every `rows_per_file` rows). Outputs are atomic:
the corpus directory and the quarantine file appear only when the import finishes, the report last, and
the report refuses to exist unless rows read == rows written + rows quarantined.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.core.fs import atomic_directory, atomic_write_json
from r1v.data.config import DataImportConfig
from r1v.data.importers import open_records
from r1v.data.importers.pool import validate_in_workers
from r1v.data.schema import CORPUS_SCHEMA, QuarantineWriter
from r1v.data.validate import Outcome, Record, Validator


class CorpusWriter:
    """Part files of up to `rows_per_file` rows, written a row group at a time: a group closes at
    `buffer_bytes` or `group_rows` rows, whichever comes first (row groups are what `r1v.data.reader` spreads
    over preprocessing tasks, so a text-only corpus must not become one giant group)."""

    def __init__(self, folder: Path, rows_per_file: int, buffer_bytes: int, group_rows: int = 256) -> None:
        self.folder, self.rows_per_file, self.buffer_bytes = folder, rows_per_file, buffer_bytes
        self.group_rows = group_rows
        self.buf: list[dict[str, Any]] = []
        self.buf_bytes = 0
        self.part_rows = 0
        self.parts = 0
        self.writer: pq.ParquetWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        self.buf.append(row)
        self.buf_bytes += sum(len(b) for b in row["images"]) + sum(len(m["content"]) for m in row["messages"])
        if (self.buf_bytes >= self.buffer_bytes or len(self.buf) >= self.group_rows
                or self.part_rows + len(self.buf) >= self.rows_per_file):
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.parts:05d}.parquet", CORPUS_SCHEMA)
        self.writer.write_table(pa.Table.from_pylist(self.buf, schema=CORPUS_SCHEMA))
        self.part_rows += len(self.buf)
        self.buf, self.buf_bytes = [], 0
        if self.part_rows >= self.rows_per_file:
            self.writer.close()
            self.writer, self.part_rows, self.parts = None, 0, self.parts + 1

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.parts += 1
        if self.parts == 0:  # an empty corpus is still a readable dataset
            pq.write_table(CORPUS_SCHEMA.empty_table(), self.folder / "part-00000.parquet")


def _make_validator(cfg: dict[str, Any]) -> Validator:
    return Validator(DataImportConfig.model_validate(cfg))


def _check(v: Validator, rec: Record, source: str) -> Outcome:
    return v(rec, source)


def _validated(records: Iterable[Record], cfg: DataImportConfig,
               source: str) -> Iterator[tuple[Record, Outcome]]:
    """(record, outcome) in input order, validated in `cfg.workers` processes, each row under
    `cfg.row_timeout_s` (`r1v.data.importers.pool`)."""
    return validate_in_workers(records, init=_make_validator, init_arg=cfg.model_dump(), check=_check,
                               source=source, workers=cfg.workers, batch_rows=cfg.batch_rows,
                               row_timeout_s=cfg.row_timeout_s,
                               preload=[__name__, *(["r1v.data.prompt", "r1v.model.assemble"] if cfg.model else [])])


def default_source_name(cfg: DataImportConfig) -> str:
    return cfg.source_name or Path(cfg.source.rstrip("/")).stem.replace("*", "") or cfg.format


def import_corpus(cfg: DataImportConfig, corpus: str | Path, quarantine: str | Path, report: str | Path,
                  progress: bool | None = None) -> dict[str, Any]:
    """Import `cfg.source` into `corpus` (a Parquet directory); returns the report also written to `report`.

    `progress`: None shows a tqdm bar only on a terminal.
    """
    from tqdm import tqdm

    corpus, quarantine, report = Path(corpus), Path(quarantine), Path(report)
    source = default_source_name(cfg)
    t0 = time.time()
    read = written = truncated = converted = 0
    by_reason: Counter[str] = Counter()
    records = open_records(cfg)
    if cfg.limit:
        records = itertools.islice(records, cfg.limit)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(corpus))
        qw = QuarantineWriter(quarantine)
        stack.callback(lambda: qw.abort() if qw.tmp.exists() else None)
        cw = CorpusWriter(tmp, cfg.rows_per_file, cfg.buffer_bytes)
        bar = stack.enter_context(tqdm(desc=f"import {cfg.format}", unit="rows", smoothing=0.1,
                                       disable=None if progress is None else not progress))
        for rec, out in _validated(records, cfg, source):
            read += 1
            if out.row is not None:
                cw.write(out.row)
                written += 1
                truncated += bool(out.truncated_turns)
                converted += out.images_converted
            else:
                qw.write({"id": rec.id, "reason": out.reason, "detail": out.detail, "source": rec.location})
                by_reason[out.reason] += 1
            bar.update(1)
            if read % 1000 == 0:
                bar.set_postfix(quarantined=sum(by_reason.values()), refresh=False)
        cw.close()
        qw.commit()
    quarantined = sum(by_reason.values())
    if read != written + quarantined:  # the invariant the whole importer exists for
        raise RuntimeError(f"import counts do not reconcile: read {read} != {written} + {quarantined}")
    secs = time.time() - t0
    rep = {"format": cfg.format, "source": cfg.source, "corpus": str(corpus), "quarantine": str(quarantine),
           "rows_read": read, "rows_written": written, "rows_quarantined": quarantined,
           "by_reason": dict(sorted(by_reason.items())), "reconciled": True, "rows_truncated": truncated,
           "images_converted": converted, "corpus_files": cw.parts, "length_checked": cfg.model is not None,
           "seconds": round(secs, 3), "rows_per_second": round(read / secs, 1) if secs > 0 else None}
    atomic_write_json(report, rep)
    return rep
