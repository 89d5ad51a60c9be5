"""GRPO workers read only their own prompts: each rank a contiguous balanced shard of the corpus, reading only the
Parquet row groups that hold it; one worker gets every row in corpus order, as before shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from r1v.data.pipeline import balanced_shard, prepare_prompts
from r1v.rl.config import GRPOConfig
from r1v.rl.grpo import load_prompts

COLUMNS = ["id", "images", "messages", "answer", "source"]


@pytest.fixture(scope="module")
def corpus(tiny_assets, tmp_path_factory):
    """The tiny train corpus (24 rows, 2 broken) rewritten as two files of row groups of 5 rows."""
    table = pq.read_table(tiny_assets["train"])
    d = tmp_path_factory.mktemp("prompts") / "train"
    d.mkdir()
    pq.write_table(table.slice(0, 14), d / "part-0.parquet", row_group_size=5)  # groups of 5, 5, 4
    pq.write_table(table.slice(14), d / "part-1.parquet", row_group_size=5)  # 5, 5
    return str(d)


def _cfg(tiny_assets, corpus: str) -> GRPOConfig:
    return GRPOConfig(model=tiny_assets["model"], corpus=corpus, rewards={"digits": 1.0},
                      reward_modules=["r1v_test_rewards"])


def _groups_read(monkeypatch) -> list[tuple[str, int]]:
    """Records the (file, row group) pairs read through pyarrow from now on; reading a whole table fails."""
    read: list[tuple[str, int]] = []
    init, batches = pq.ParquetFile.__init__, pq.ParquetFile.iter_batches

    def spy_init(self, source, *args, **kw):
        init(self, source, *args, **kw)
        self.r1v_source = str(source)

    def spy_batches(self, *args, row_groups=None, **kw):
        read.extend((self.r1v_source, g) for g in (range(self.num_row_groups) if row_groups is None else row_groups))
        return batches(self, *args, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "__init__", spy_init)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_batches)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole table"))
    return read


def test_each_rank_reads_only_the_row_groups_of_its_rows(tiny_assets, corpus, monkeypatch):
    c = _cfg(tiny_assets, corpus)
    ids = pq.read_table(corpus, columns=["id"]).column("id").to_pylist()
    groups = [("part-0", 0, 5), ("part-0", 5, 10), ("part-0", 10, 14), ("part-1", 14, 19), ("part-1", 19, 24)]
    world, seen = 3, []
    for rank in range(world):
        read = _groups_read(monkeypatch)
        good, bad = load_prompts(c, rank, world)
        monkeypatch.undo()
        mine = balanced_shard(np.arange(24), world, rank).tolist()  # rows 0-7, 8-15, 16-23
        got = [p["id"] for p in good]
        assert got == [ids[i] for i in mine if ids[i] in got]  # corpus order
        assert sorted(got + [b["id"] for b in bad]) == sorted(ids[i] for i in mine)
        holding = [(f, g) for f, g in _indexed(groups) if set(range(*groups_span(groups, f, g))) & set(mine)]
        assert sorted((Path(f).stem, g) for f, g in read) == holding, rank  # each once, no other
        seen += got + [b["id"] for b in bad]
    assert sorted(seen) == sorted(ids)


def _indexed(groups: list[tuple[str, int, int]]) -> list[tuple[str, int]]:
    """(file stem, row group within the file) of each group."""
    out, count = [], {}
    for f, _, _ in groups:
        out.append((f, count.get(f, 0)))
        count[f] = count.get(f, 0) + 1
    return out


def groups_span(groups: list[tuple[str, int, int]], f: str, g: int) -> tuple[int, int]:
    """The global rows [start, end) of row group `g` of file `f`."""
    return next((s, e) for (ff, gg), (_, s, e) in zip(_indexed(groups), groups, strict=True) if (ff, gg) == (f, g))


def test_one_worker_gets_the_prompts_of_the_whole_corpus_in_order(tiny_assets, corpus):
    c = _cfg(tiny_assets, corpus)
    before = prepare_prompts(pq.read_table(corpus, columns=COLUMNS).to_pylist(), c.model, c.preprocess)
    assert load_prompts(c, 0, 1) == before
