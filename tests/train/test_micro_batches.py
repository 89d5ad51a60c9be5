"""How the SFT loop cuts a rank's shard into micro-steps, with and without packing, and resumes mid-epoch."""

from __future__ import annotations

import copy

import pytest

from r1v.config import SFTConfig
from r1v.train.sft import micro_batches


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        bad = i % 7 == 3
        rows.append({"id": f"r{i}", "input_ids": [] if bad else [1] * (5 + (i * 13) % 40), "labels": [],
                     "pixel_values": b"", "n_tiles": 0, "error": "image_decode" if bad else "", "detail": "",
                     "source": "t", "answer": ""})
    return rows


def fresh_state() -> dict:
    return {"rows_consumed": 0, "buffer_start": 0, "groups_done": 0}


@pytest.mark.parametrize("packing", [False, True])
def test_every_row_once_and_exact_resume(ray_cluster, packing):
    import ray.data

    rows = make_rows(50)
    c = SFTConfig(model="m", corpus="c", batch_size=2, packing=packing, max_tokens=64, pack_buffer=12)
    ds = ray.data.from_items(rows)

    state = fresh_state()
    groups = []
    for g in micro_batches(ds.iterator(), c, state):
        state["rows_consumed"] += len(g)  # what the loop does after each micro-step
        groups.append([r["id"] for r in g])
    seen = [i for g in groups for i in g]
    assert sorted(seen) == sorted(r["id"] for r in rows)  # every row exactly once, bad rows included
    if packing:
        by_id = {r["id"]: r for r in rows}
        for g in groups:  # a micro-step holds at most batch_size sequences of <= max_tokens each
            assert sum(len(by_id[i]["input_ids"]) for i in g) <= 2 * 64

    for crash_after in (1, 4, len(groups) - 1):
        state = fresh_state()
        it = micro_batches(ds.iterator(), c, state)
        done = []
        for _ in range(crash_after):
            g = next(it)
            state["rows_consumed"] += len(g)
            done.append([r["id"] for r in g])
        saved = copy.deepcopy(state)  # the checkpoint
        rest = [[r["id"] for r in g] for g in micro_batches(ds.iterator(), c, saved)]
        assert done + rest == groups
