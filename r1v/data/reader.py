"""A Ray Data source that reads a corpus a few Parquet row groups per task.

Why not `ray.data.read_parquet`: it makes one read task per *file* (Ray 2.60; `override_num_blocks` does not
split a file) and that task yields the file as one block (up to 128 MB), which one preprocessing task then
took whole: a corpus in one part file was preprocessed on a single core however many CPUs were free. Row
groups are the unit Parquet can read independently; the writers bound their size (`write_corpus`, the
importer's `CorpusWriter`), so tasks stay small enough to spread over every worker.

Tasks come in file order and row-group order, so with `preserve_order` the rows come out in corpus order. With a
`seed` the order is a seeded permutation instead (row groups within each file, then the tasks across files): SFT
builds one dataset per epoch with seed (trainer seed, epoch), so each epoch visits the corpus in another order
that a resumed run regenerates exactly (the SFT resume skips consumed rows by count).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
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


Transform = Callable[[pa.Table], pa.Table]


def _read_groups(file: str, groups: Sequence[int], columns: Sequence[str] | None, batch_rows: int,
                 transform: Transform | None) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(file)
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(groups), columns=columns):
        table = pa.Table.from_batches([batch])
        yield table if transform is None else transform(table)


class RowGroupSource(Datasource):
    """Read tasks of row groups of one file, each task up to `rows_per_task` rows (a larger row group is a task of
    its own: Parquet cannot read part of one). Without `seed` a task's groups are consecutive and tasks come in
    corpus order; with one, each file's groups are taken in a permutation drawn from `seed` and the tasks are
    permuted across files too: the same seed gives the same order.

    `transform` maps every `batch_rows`-row table inside the read task. Why not a `map_batches` after the read:
    Ray does not fuse a read with a `map_batches(batch_size=...)` (it may change row counts), so every block
    would make an extra hop through the object store into another task; here the rows are read and
    preprocessed by the same task, `batch_rows` at a time.
    """

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None, rows_per_task: int = 64,
                 batch_rows: int = 64, transform: Transform | None = None,
                 seed: int | Sequence[int] | None = None) -> None:
        if rows_per_task < 1 or batch_rows < 1:
            raise ValueError("rows_per_task and batch_rows must be >= 1")
        self.columns = list(columns) if columns is not None else None
        self.batch_rows, self.transform = batch_rows, transform
        self.chunks: list[tuple[str, list[int], int, int]] = []  # file, row groups, rows, uncompressed bytes
        self.schema: pa.Schema | None = None
        rng = None if seed is None else np.random.default_rng(seed)
        for file in corpus_files(path):
            meta = pq.ParquetFile(file).metadata
            if self.schema is None:
                schema = meta.schema.to_arrow_schema()
                self.schema = pa.schema([schema.field(c) for c in self.columns]) if self.columns else schema
            groups: list[int] = []
            rows = size = 0
            order = range(meta.num_row_groups) if rng is None else rng.permutation(meta.num_row_groups).tolist()
            for g in order:
                rg = meta.row_group(g)
                if groups and rows + rg.num_rows > rows_per_task:
                    self.chunks.append((str(file), groups, rows, size))
                    groups, rows, size = [], 0, 0
                groups.append(g)
                rows += rg.num_rows
                size += rg.total_byte_size
            if groups:
                self.chunks.append((str(file), groups, rows, size))
        if rng is not None:
            self.chunks = [self.chunks[i] for i in rng.permutation(len(self.chunks))]

    def estimate_inmemory_data_size(self) -> int:
        return sum(c[3] for c in self.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
                       ) -> list[ReadTask]:
        """One task per chunk, whatever `parallelism` asks: the chunks already bound the work of a task."""
        return [
            ReadTask(functools.partial(_read_groups, file, groups, self.columns, self.batch_rows, self.transform),
                     BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None, input_files=(file,)),
                     schema=self.schema, per_task_row_limit=per_task_row_limit)
            for file, groups, rows, size in self.chunks
        ]


def read_corpus(path: str | Path, columns: Sequence[str] | None = None, rows_per_task: int = 64,
                batch_rows: int = 64, transform: Transform | None = None, concurrency: int | None = None,
                seed: int | Sequence[int] | None = None):
    """A Ray Dataset over a corpus, parallel across row groups as well as files; `transform` runs on every
    `batch_rows` rows inside the read tasks, at most `concurrency` of which run at once (default: as many as
    there are free CPUs). With `seed`, row groups come in a seeded permutation (see `RowGroupSource`)."""
    import ray.data

    source = RowGroupSource(path, columns, rows_per_task, batch_rows, transform, seed)
    # As many blocks as chunks: otherwise Ray splits each task's output to reach its own block-count target.
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(source.chunks)), concurrency=concurrency)
