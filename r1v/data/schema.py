"""The one corpus schema (DESIGN.md): every importer writes it and every stage reads it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.core.fs import atomic_directory, owner_tag, remove_stale

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

CORPUS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(pa.binary())),
        ("messages", pa.list_(MESSAGE)),
        ("answer", pa.string()),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string())]
)


def make_row(id: str, messages: list[dict[str, str]], images: list[bytes] | None = None, answer: str = "",
             source: str = "", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": id, "images": list(images or []), "messages": messages, "answer": answer,
            "source": source, "meta": json.dumps(meta or {})}


def question(row: dict[str, Any], limit: int = 2000) -> str:
    """The text of a row's last user turn (what a sample table shows as the prompt), clipped to `limit`."""
    for m in reversed(row.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content") or "")[:limit]
    return ""


def write_corpus(rows: Iterable[dict[str, Any]], path: str | Path, rows_per_file: int = 10_000,
                 row_group_rows: int = 64) -> Path:
    """Write rows as a Parquet dataset directory, atomically (a crash leaves no half corpus).

    Row groups of `row_group_rows` rows are the unit `r1v.data.reader` spreads over preprocessing tasks.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        buf: list[dict[str, Any]] = []
        n = 0

        def flush() -> None:
            nonlocal n
            if buf:
                pq.write_table(pa.Table.from_pylist(buf, schema=CORPUS_SCHEMA), tmp / f"part-{n:05d}.parquet",
                               row_group_size=row_group_rows)
                n += 1
                buf.clear()

        for row in rows:
            buf.append(row)
            if len(buf) >= rows_per_file:
                flush()
        flush()
        if n == 0:
            pq.write_table(CORPUS_SCHEMA.empty_table(), tmp / "part-00000.parquet")
    return path


def read_corpus(path: str | Path) -> pa.Table:
    return pq.read_table(str(path), schema=CORPUS_SCHEMA)


class QuarantineWriter:
    """quarantine.parquet (id, reason, detail, source location), written to a temp name, renamed at close."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the temp name carries its writer, so a killed import's temp is removed by the next one
        remove_stale(path.parent, f".{path.name}.", ".tmp")
        self.path, self.tmp = path, path.with_name(f".{path.name}.{owner_tag()}{os.urandom(4).hex()}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, QUARANTINE_SCHEMA)
        self.buf: list[dict[str, str]] = []

    def write(self, rec: dict[str, str]) -> None:
        self.buf.append(rec)
        if len(self.buf) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.writer.write_table(pa.Table.from_pylist(self.buf, schema=QUARANTINE_SCHEMA))
            self.buf = []

    def commit(self) -> None:
        self.flush()
        self.writer.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def write_quarantine(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write quarantined rows (id, reason, detail, source) as one Parquet file, atomically."""
    writer = QuarantineWriter(Path(path))
    for r in rows:
        writer.write({k: r.get(k, "") for k in QUARANTINE_SCHEMA.names})
    writer.commit()
