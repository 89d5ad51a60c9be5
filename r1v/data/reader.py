"""A Ray Data source that reads a corpus a few Parquet row groups per task.

Why not `ray.data.read_parquet`: it makes one read task per *file* (Ray 2.60; `override_num_blocks` does not
split a file), and Ray Data fuses the read with the preprocessing `map_batches`, so a corpus in one part file
was preprocessed by a single task on a single core however many CPUs were free. Row groups are the unit
Parquet can read independently; the writers bound their size (`write_corpus`, the importer's
`buffer_bytes`), so tasks stay small enough to spread over every worker.

Tasks come in file order and row-group order, so with `preserve_order` the rows come out in corpus order (the
SFT resume skips consumed rows by count).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


def corpus_files(path: str | Path) -> list[Path]:
    """The Parquet part files of a corpus directory (or the one file), in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in
                                                                  p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return files


def _read_groups(file: str, groups: Sequence[int], columns: Sequence[str] | None, batch_rows: int
                 ) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(file)
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(groups), columns=columns):
        yield pa.Table.from_batches([batch])


class RowGroupSource(Datasource):
    """Read tasks of consecutive row groups of one file, each task up to `rows_per_task` rows (a larger row
    group is a task of its own: Parquet cannot read part of one)."""

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None, rows_per_task: int = 64,
                 batch_rows: int = 64) -> None:
        if rows_per_task < 1 or batch_rows < 1:
            raise ValueError("rows_per_task and batch_rows must be >= 1")
        self.columns = list(columns) if columns is not None else None
        self.batch_rows = batch_rows
        self.chunks: list[tuple[str, list[int], int, int]] = []  # file, row groups, rows, uncompressed bytes
        self.schema: pa.Schema | None = None
        for file in corpus_files(path):
            meta = pq.ParquetFile(file).metadata
            if self.schema is None:
                schema = meta.schema.to_arrow_schema()
                self.schema = pa.schema([schema.field(c) for c in self.columns]) if self.columns else schema
            groups: list[int] = []
            rows = size = 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                if groups and rows + rg.num_rows > rows_per_task:
                    self.chunks.append((str(file), groups, rows, size))
                    groups, rows, size = [], 0, 0
                groups.append(g)
                rows += rg.num_rows
                size += rg.total_byte_size
            if groups:
                self.chunks.append((str(file), groups, rows, size))

    def estimate_inmemory_data_size(self) -> int:
        return sum(c[3] for c in self.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
                       ) -> list[ReadTask]:
        """One task per chunk, whatever `parallelism` asks: the chunks already bound the work of a task."""
        return [
            ReadTask(functools.partial(_read_groups, file, groups, self.columns, self.batch_rows),
                     BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None, input_files=(file,)),
                     schema=self.schema, per_task_row_limit=per_task_row_limit)
            for file, groups, rows, size in self.chunks
        ]


def read_corpus(path: str | Path, columns: Sequence[str] | None = None, rows_per_task: int = 64):
    """A Ray Dataset over a corpus, parallel across row groups as well as files."""
    import ray.data

    return ray.data.read_datasource(RowGroupSource(path, columns, rows_per_task))
