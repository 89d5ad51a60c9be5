"""SFT's per-epoch corpus order: a seeded permutation of row groups, the same every time it is computed (on every
rank, from the metadata alone) and a new one every epoch; each rank reads only its rows of it, by global index."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1v.data.reader import RowGroupSource, read_corpus


def write_corpus(root, files: int = 3, rows: int = 60, group: int = 10) -> list[int]:
    for f in range(files):
        xs = list(range(f * rows, (f + 1) * rows))
        pq.write_table(pa.table({"x": xs}), root / f"part-{f:05d}.parquet", row_group_size=group)
    return list(range(files * rows))


def units(src: RowGroupSource) -> list[tuple[str, int]]:
    return [(file, g) for file, groups, _, _ in src.chunks for g in groups]


def test_seeded_row_group_order(tmp_path):
    write_corpus(tmp_path)
    plain = RowGroupSource(tmp_path, rows_per_task=20)
    orders = {e: RowGroupSource(tmp_path, rows_per_task=20, seed=[0, e]) for e in range(3)}
    assert units(RowGroupSource(tmp_path, rows_per_task=20, seed=[0, 1])) == units(orders[1])  # replayable
    assert len({tuple(units(s)) for s in orders.values()} | {tuple(units(plain))}) == 4  # a new order per epoch
    for src in orders.values():
        assert sorted(units(src)) == sorted(units(plain))  # every row group exactly once
        assert all(rows <= 20 for _, _, rows, _ in src.chunks)
        assert len({file for file, _, _, _ in src.chunks[:3]}) > 1  # tasks interleave files


def rank_rows(path, seed, keep) -> list[int]:
    """The rows a rank's dataset yields when it keeps the global indices `keep`."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as preprocessed_dataset sets
    ds = read_corpus(path, rows_per_task=20, batch_rows=5, seed=seed, keep=keep)
    return [(r["x"], r["row"]) for r in ds.iter_rows()]


def test_ranks_read_their_rows_of_the_order(ray_cluster, tmp_path):
    from r1v.data.pipeline import balanced_shard

    every = write_corpus(tmp_path)  # x == the global index
    order = RowGroupSource(tmp_path, rows_per_task=20, seed=[5, 0]).order()
    assert sorted(order.tolist()) == every and order.tolist() != every
    assert RowGroupSource(tmp_path, rows_per_task=20, seed=[5, 0]).order().tolist() == order.tolist()
    got = [rank_rows(tmp_path, [5, 0], balanced_shard(order, 2, r)) for r in range(2)]
    assert [x for part in got for x, _ in part] == order.tolist()  # each rank its share, in the epoch's order
    assert all(x == row for part in got for x, row in part)
    # After a resume that consumed some scattered rows: the rest, over three ranks now.
    consumed = order[np.r_[0:7, 40:45, 100:101]]
    rest = order[~np.isin(order, consumed)]
    got = [rank_rows(tmp_path, [5, 0], balanced_shard(rest, 3, r)) for r in range(3)]
    assert [x for part in got for x, _ in part] == rest.tolist()
    assert max(map(len, got)) - min(map(len, got)) <= 1
