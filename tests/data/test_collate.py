"""Preprocessed Arrow batches -> rows and padded tensors, as the SFT loop consumes them."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from r1v.core.config import PreprocessConfig
from r1v.data.collate import collate_sft, table_rows
from r1v.data.pipeline import preprocess_batch


def test_table_rows_match_to_pylist_without_copying(tiny_assets):
    corpus = pq.read_table(tiny_assets["train"])
    table = preprocess_batch(corpus, tiny_assets["model"], PreprocessConfig().model_dump())
    for t in (table, table.slice(3, 7)):  # a slice has a non-zero offset into the Arrow buffers
        plain, fast = t.to_pylist(), table_rows(t)
        assert len(plain) == len(fast)
        for a, b in zip(plain, fast, strict=True):
            assert isinstance(b["pixel_values"], memoryview)
            assert bytes(b["pixel_values"]) == a["pixel_values"]
            for k in ("input_ids", "labels"):
                assert isinstance(b[k], np.ndarray) and b[k].dtype == np.int32
                assert b[k].tolist() == a[k]
            views = ("pixel_values", "input_ids", "labels")
            assert {k: v for k, v in a.items() if k not in views} == {k: v for k, v in b.items() if k not in views}
    good = [r for r in table_rows(table) if not r["error"]][:4]
    batch = collate_sft(good, pad_id=0, tile_size=56)
    ref = np.concatenate([np.frombuffer(r["pixel_values"], np.uint8) for r in good])
    assert batch["pixel_values"].dtype.is_floating_point is False
    np.testing.assert_array_equal(batch["pixel_values"].numpy().reshape(-1), ref)
    assert (batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in good])


def test_batch_pixel_buffer_matches_rows_one_by_one(tiny_assets):
    """`preprocess_batch` tiles every row into one shared buffer; broken rows in between take no bytes."""
    from r1v.data.pipeline import PREPROCESSED_SCHEMA, RowError, preprocess_row

    corpus = pq.read_table(tiny_assets["train"])
    pre = PreprocessConfig()
    table = preprocess_batch(corpus, tiny_assets["model"], pre.model_dump())
    assert table.schema == PREPROCESSED_SCHEMA
    errors = 0
    for row, got in zip(corpus.to_pylist(), table.to_pylist(), strict=True):
        try:
            one = preprocess_row(row, tiny_assets["model"], pre)
        except RowError as e:
            errors += 1
            assert (got["error"], got["pixel_values"], got["n_tiles"]) == (e.reason, b"", 0)
            continue
        assert got["error"] == "" and got["n_tiles"] == one["n_tiles"]
        assert got["pixel_values"] == one["pixel_values"]
        assert (got["input_ids"], got["labels"]) == (one["input_ids"], one["labels"])
    assert errors == 2  # the fixture's two truncated images
