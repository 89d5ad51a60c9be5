"""The one corpus schema (DESIGN.md): every importer writes it and every stage reads it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.fsutil import atomic_directory

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


def write_corpus(rows: Iterable[dict[str, Any]], path: str | Path, rows_per_file: int = 10_000) -> Path:
    """Write rows as a Parquet dataset directory, atomically (a crash leaves no half corpus)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        buf: list[dict[str, Any]] = []
        n = 0

        def flush() -> None:
            nonlocal n
            if buf:
                pq.write_table(pa.Table.from_pylist(buf, schema=CORPUS_SCHEMA), tmp / f"part-{n:05d}.parquet")
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
