"""Corpora for the scoring tests: rows in the corpus schema, written with extra columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.data.schema import CORPUS_SCHEMA, make_row

GOOD = "<think>\nThe numbers are 3 and 4. 3 + 4 = 7.\n</think>\nAnswer: \\boxed{7}"


def row(id: str, response: str | None = GOOD, answer: str = "7", source: str = "s", question: str = "What is 3 + 4?",
        images: list[bytes] | None = None, **meta: Any) -> dict[str, Any]:
    q = ("<image>\n" * len(images or [])) + question
    msgs = [{"role": "user", "content": q}] + ([{"role": "assistant", "content": response}] if response else [])
    return make_row(id, msgs, images, answer=answer, source=source, meta=meta)


def write(path: Path, rows: list[dict[str, Any]], extra: dict[str, tuple[pa.DataType, list[Any]]] | None = None,
          files: int = 1) -> Path:
    """Rows (plus extra columns) as a corpus directory of `files` part files."""
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA)
    for name, (typ, values) in (extra or {}).items():
        table = table.append_column(pa.field(name, typ), pa.array(values, typ))
    per = -(-len(rows) // files) if rows else 0
    for k in range(files):
        pq.write_table(table.slice(k * per, per), path / f"part-{k:05d}.parquet", row_group_size=4)
    return path


def read(path: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(str(path)).to_pylist()


def meta(r: dict[str, Any]) -> dict[str, Any]:
    return json.loads(r["meta"])
