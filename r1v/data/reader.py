"""A Ray Data source that reads a corpus a few Parquet row groups per task.

Why not `ray.data.read_parquet`: it makes one read task per *file* (Ray 2.60; `override_num_blocks` does not
split a file) and that task yields the file as one block (up to 128 MB), which one preprocessing task then
took whole: a corpus in one part file was preprocessed on a single core however many CPUs were free. Row
groups are the unit Parquet can read independently; the writers bound their size (`write_corpus`, the
importer's `CorpusWriter`), so tasks stay small enough to spread over every worker.

Tasks come in file order and row-group order, so with `preserve_order` the rows come out in corpus order. With a
`seed` the order is a seeded permutation instead (row groups within each file, then the tasks across files): SFT
builds one dataset per epoch with seed (trainer seed, epoch), so each epoch visits the corpus in another order
that a resumed run regenerates exactly.

A row's global index is its position in corpus order (files in name order, then rows within a file); it names the
row whatever the read order. With `row_index` the source adds it as a `row` column, and with `keep` it reads only
the row groups holding those rows and drops the others before `transform` (so an SFT rank decodes only its own
rows: `r1v.data.pipeline.preprocessed_dataset`).
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

from r1v.core.storage import stage_local


def corpus_files(path: str | Path) -> list[Path]:
    """The Parquet part files of a corpus directory (or the one file), in name order (staged on this node when
    the corpus lies in an object store)."""
    path = stage_local(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in
                                                                  p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    return files


Transform = Callable[[pa.Table], pa.Table]


def _read_groups(file: str, groups: Sequence[int], columns: Sequence[str] | None, batch_rows: int,
                 transform: Transform | None, starts: Sequence[int] | None = None,
                 keep: np.ndarray | None = None) -> Iterator[pa.Table]:
    """The rows of `groups`, `batch_rows` at a time. With `starts` (each group's first global index) they carry a
    `row` column; with `keep` (sorted global indices) only those rows are kept, before `transform` sees them."""
    pf = pq.ParquetFile(stage_local(file))  # a read task may run on another node than its planner
    if starts is None:
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(groups), columns=columns):
            table = pa.Table.from_batches([batch])
            yield table if transform is None else transform(table)
        return
    pending: list[pa.Table] = []
    held = 0

    def flush() -> Iterator[pa.Table]:
        table = pa.concat_tables(pending)
        pending.clear()
        yield table if transform is None else transform(table)

    for g, start in zip(groups, starts, strict=True):
        if keep is not None and not np.any((keep >= start) & (keep < start + pf.metadata.row_group(g).num_rows)):
            continue  # a group of the task without kept rows: not read at all
        at = start
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns):
            index = np.arange(at, at + batch.num_rows, dtype=np.int64)
            at += batch.num_rows
            table = pa.Table.from_batches([batch]).append_column("row", pa.array(index))
            if keep is not None:
                table = table.filter(pa.array(np.isin(index, keep, assume_unique=True)))
            if table.num_rows:
                pending.append(table)
                held += table.num_rows
            if held >= batch_rows:  # kept rows of several batches make one transform call
                yield from flush()
                held = 0
    if pending:
        yield from flush()


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
                 seed: int | Sequence[int] | None = None, row_index: bool = False,
                 keep: np.ndarray | None = None) -> None:
        if rows_per_task < 1 or batch_rows < 1:
            raise ValueError("rows_per_task and batch_rows must be >= 1")
        self.columns = list(columns) if columns is not None else None
        self.batch_rows, self.transform = batch_rows, transform
        self.row_index = row_index or keep is not None
        self.keep = None if keep is None else np.unique(np.asarray(keep, dtype=np.int64))
        self.chunks: list[tuple[str, list[int], int, int]] = []  # file, row groups, rows, uncompressed bytes
        self.starts: dict[tuple[str, int], tuple[int, int]] = {}  # (file, group) -> (first global index, rows)
        self.schema: pa.Schema | None = None
        rng = None if seed is None else np.random.default_rng(seed)
        offset = 0
        for file in corpus_files(path):
            meta = pq.ParquetFile(file).metadata
            for g in range(meta.num_row_groups):
                self.starts[(str(file), g)] = (offset, meta.row_group(g).num_rows)
                offset += meta.row_group(g).num_rows
            if self.schema is None:
                schema = meta.schema.to_arrow_schema()
                self.schema = pa.schema([schema.field(c) for c in self.columns]) if self.columns else schema
                if self.row_index:
                    self.schema = self.schema.append(pa.field("row", pa.int64()))
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
        if self.keep is not None:  # after the permutation: the order of what is kept is the full order's
            self.chunks = [ch for ch in self.chunks if self._kept(ch[0], ch[1]).size]

    def order(self) -> np.ndarray:
        """Global indices of every row, in the order this source reads them (before `keep`)."""
        parts = [np.arange(s, s + n, dtype=np.int64) for file, groups, _, _ in self.chunks
                 for s, n in (self.starts[(file, g)] for g in groups)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _kept(self, file: str, groups: Sequence[int]) -> np.ndarray:
        rows = np.concatenate([np.arange(s, s + n) for s, n in (self.starts[(file, g)] for g in groups)])
        return rows[np.isin(rows, self.keep, assume_unique=True)]

    def estimate_inmemory_data_size(self) -> int:
        return sum(c[3] for c in self.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
                       ) -> list[ReadTask]:
        """One task per chunk, whatever `parallelism` asks: the chunks already bound the work of a task."""
        tasks = []
        for file, groups, rows, size in self.chunks:
            starts = [self.starts[(file, g)][0] for g in groups] if self.row_index else None
            keep = None if self.keep is None else self._kept(file, groups)
            read = functools.partial(_read_groups, file, groups, self.columns, self.batch_rows, self.transform,
                                     starts, keep)
            n = rows if keep is None else len(keep)
            tasks.append(ReadTask(read, BlockMetadata(num_rows=n, size_bytes=size, exec_stats=None,
                                                      input_files=(file,)),
                                  schema=self.schema, per_task_row_limit=per_task_row_limit))
        return tasks


def read_corpus(path: str | Path, columns: Sequence[str] | None = None, rows_per_task: int = 64,
                batch_rows: int = 64, transform: Transform | None = None, concurrency: int | None = None,
                seed: int | Sequence[int] | None = None, row_index: bool = False, keep: np.ndarray | None = None):
    """A Ray Dataset over a corpus, parallel across row groups as well as files; `transform` runs on every
    `batch_rows` rows inside the read tasks, at most `concurrency` of which run at once (default: as many as
    there are free CPUs). With `seed`, row groups come in a seeded permutation; `row_index` and `keep`: see
    `RowGroupSource`."""
    import ray.data

    source = RowGroupSource(path, columns, rows_per_task, batch_rows, transform, seed, row_index, keep)
    # As many blocks as chunks: otherwise Ray splits each task's output to reach its own block-count target.
    if not source.chunks:  # nothing kept: Ray refuses a source without read tasks
        return ray.data.from_arrow(source.schema.empty_table())
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(source.chunks)), concurrency=concurrency)


def row_count(path: str | Path) -> int:
    """The corpus's number of rows, from the Parquet footers alone."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in corpus_files(path))


def read_rows(path: str | Path, rows: np.ndarray, columns: Sequence[str] | None = None, batch_rows: int = 64
              ) -> pa.Table:
    """The corpus rows with global indices `rows`, in corpus order, with their `row` column, read in this process
    (no Ray tasks): only the row groups holding them are read (`RowGroupSource` with `keep`), so a contiguous
    share of the corpus costs about its own size, not the corpus's."""
    source = RowGroupSource(path, columns, batch_rows=batch_rows, keep=rows)
    tables = [t for file, groups, _, _ in source.chunks
              for t in _read_groups(file, groups, source.columns, batch_rows, None,
                                    [source.starts[(file, g)][0] for g in groups], source._kept(file, groups))]
    return pa.concat_tables(tables) if tables else source.schema.empty_table()
