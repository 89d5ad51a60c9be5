"""Packing: bins keep the budget and drop nothing; a packed batch gives each sample its loss when alone."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from r1v.core.config import PreprocessConfig
from r1v.data.collate import IGNORE, collate_sft
from r1v.data.packing import (
    block_causal_mask,
    collate_packed,
    packed_logits,
    padding_fraction,
    per_sample_nll,
    token_budget_batches,
)
from r1v.model.forward import normalize_pixels

# ---------------------------------------------------------------------------------------------------------
# token_budget_batches / padding_fraction (no model)
# ---------------------------------------------------------------------------------------------------------


def _check_bins(lengths: list[int], bins: list[list[int]], budget: int) -> None:
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every row exactly once"
    for b in bins:
        total = sum(lengths[i] for i in b)
        assert total <= budget or len(b) == 1, (b, total)
        assert b == sorted(b)


@pytest.mark.parametrize("seed", range(20))
def test_bins_respect_budget_and_keep_every_row(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.choice([16, 100, 1000])
    lengths = [rng.randint(1, int(budget * 1.3)) for _ in range(rng.randint(1, 60))]
    bins = token_budget_batches(lengths, budget)
    _check_bins(lengths, bins, budget)
    assert token_budget_batches(lengths, budget) == bins  # deterministic
    # first-fit decreasing is within 11/9 OPT + 1 bins; the volume bound is a weaker, easy check
    fitting = [n for n in lengths if n <= budget]
    assert len(bins) <= len(lengths) - len(fitting) + (11 * -(-sum(fitting) // budget)) // 9 + 1


def test_bins_known_cases() -> None:
    assert token_budget_batches([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]  # FFD: 6+4, 5+3+2
    assert token_budget_batches([50, 3, 4], 10) == [[0], [1, 2]]  # over budget: alone, kept
    assert token_budget_batches([10, 10], 10) == [[0], [1]]  # exactly the budget fits
    assert token_budget_batches([], 10) == []
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches([1], 0)


def test_padding_fraction() -> None:
    lengths = [4, 2, 2, 8]
    assert padding_fraction(lengths, [[0, 1], [2, 3]], "padded") == pytest.approx(1 - 16 / 24)
    assert padding_fraction(lengths, [[0, 1, 2], [3]], "packed") == pytest.approx(0.0)
    assert padding_fraction(lengths, [[0, 1], [2, 3]], "packed") == pytest.approx(1 - 16 / 20)
    assert padding_fraction(lengths, [[0, 1, 2], [3]], "packed", pad_to=10) == pytest.approx(1 - 16 / 20)
    with pytest.raises(ValueError, match="pad_to=5"):
        padding_fraction(lengths, [[3]], "padded", pad_to=5)
    with pytest.raises(ValueError, match="mode"):
        padding_fraction(lengths, [[0]], "other")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Collation and the acceptance check on a tiny VLM
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    model, tok = build_tiny_vlm(TinySpec())
    path = tmp_path_factory.mktemp("packing") / "tiny"
    save_model(model, tok, path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir: str) -> Any:
    from r1v.model.io import load_model

    m, _ = load_model(model_dir)
    return m.eval()


@pytest.fixture(scope="module")
def rows(model_dir: str) -> list[dict[str, Any]]:
    """Preprocessed SFT rows of different lengths and tile counts, one without an image."""
    from r1v.data.pipeline import preprocess_row
    from r1v.data.synthetic import make_example

    rng = random.Random(0)
    corpus = []
    for i, (w, h) in enumerate([(112, 56), (56, 56), (40, 200), (300, 90), (112, 56), (90, 90), (60, 30)]):
        row = make_example(i, "train", rng, w, h, max_value=99, ops=["sum", "product"])
        if i % 3 == 1:  # longer reasoning for some rows: lengths must differ
            msgs = [dict(m) for m in row["messages"]]
            msgs[-1]["content"] = msgs[-1]["content"].replace(
                "<think>\n", "<think>\nLet me look carefully. " * 3
            )
            row["messages"] = msgs
        corpus.append(row)
    corpus.append(
        {
            "id": "text-only",
            "images": [],
            "answer": "4",
            "source": "t",
            "meta": "{}",
            "messages": [
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "<think>\n2 + 2 = 4.\n</think>\n\\boxed{4}"},
            ],
        }
    )
    out = [preprocess_row(r, model_dir, PreprocessConfig(max_tiles=6), with_labels=True) for r in corpus]
    assert len({len(r["input_ids"]) for r in out}) >= 4
    return out


def _tile(model: Any) -> int:
    return int(
        model.config.vision_config.image_size[0]
        if isinstance(model.config.vision_config.image_size, list)
        else model.config.vision_config.image_size
    )


def test_collate_layout(rows: list[dict[str, Any]], model: Any) -> None:
    pad = int(model.config.text_config.pad_token_id)
    budget = 2 * max(len(r["input_ids"]) for r in rows)
    batch = collate_packed(rows, pad, _tile(model), budget)
    bins = batch["bins"]
    assert len(bins) < len(rows), "the budget must force real packing"
    _check_bins([len(r["input_ids"]) for r in rows], bins, budget)
    ids, pos, lab, owner = batch["input_ids"], batch["position_ids"], batch["labels"], batch["sample_index"]
    assert batch["attention_mask"] is None
    tiles = []
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(rows[i]["input_ids"])
            assert ids[b, at : at + n].tolist() == rows[i]["input_ids"]
            assert pos[b, at : at + n].tolist() == list(range(n))
            assert (owner[b, at : at + n] == i).all()
            assert lab[b, at].item() == IGNORE and lab[b, at + 1 : at + n].tolist() == rows[i]["labels"][1:]
            at += n
            if rows[i]["n_tiles"]:
                tiles.append(np.frombuffer(rows[i]["pixel_values"], np.uint8))
        assert (ids[b, at:] == pad).all() and (lab[b, at:] == IGNORE).all() and (owner[b, at:] == -1).all()
        assert pos[b, at:].tolist() == list(range(ids.shape[1] - at))
    np.testing.assert_array_equal(batch["pixel_values"].numpy().reshape(-1), np.concatenate(tiles))
    n_ctx = int((ids == model.config.image_token_id).sum())
    assert n_ctx == batch["pixel_values"].shape[0] * model.config.image_seq_length


def test_block_causal_mask() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seg)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def _alone(model: Any, rows: list[dict[str, Any]], tile: int) -> tuple[list[float], list[int]]:
    """Each row run by itself: summed NLL over its labels and the label count."""
    from r1v.model.forward import multimodal_logits
    from r1v.train.sft import token_nll

    sums, counts = [], []
    for r in rows:
        b = collate_sft([r], 0, tile)
        with torch.no_grad():
            logits = multimodal_logits(model, b["input_ids"], b["attention_mask"], b["pixel_values"])
        nll, n = token_nll(logits, b["labels"])
        sums.append(float(nll))
        counts.append(n)
    return sums, counts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", ["position_ids", "4d"])
def test_packed_loss_equals_one_by_one(rows: list[dict[str, Any]], model: Any, attn: str, mask: str) -> None:
    from r1v.train.sft import token_nll

    model.set_attn_implementation(attn)
    try:
        tile = _tile(model)
        ref_sum, ref_n = _alone(model, rows, tile)
        budget = int(1.6 * max(len(r["input_ids"]) for r in rows))
        batch = collate_packed(rows, int(model.config.text_config.pad_token_id), tile, budget, mask=mask)
        assert len(batch["bins"]) < len(rows) and max(map(len, batch["bins"])) >= 2
        with torch.no_grad():
            logits = packed_logits(model, batch)
        sums, counts = per_sample_nll(logits, batch, len(rows))
        assert counts.tolist() == ref_n
        per_sample = (sums / counts).tolist()
        expected = [s / n for s, n in zip(ref_sum, ref_n, strict=True)]
        np.testing.assert_allclose(per_sample, expected, rtol=0, atol=1e-5)
        # the SFT objective on the packed batch is the sum of the samples' own losses
        total, n_tok = token_nll(logits, batch["labels"])
        assert n_tok == sum(ref_n)
        assert float(total) == pytest.approx(sum(ref_sum), rel=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


def test_model_forward_needs_use_cache_false(rows: list[dict[str, Any]], model: Any) -> None:
    """`model(...)` (what the SFT loop calls through the engine) matches too, if and only if use_cache=False.

    With a cache, transformers skips its packed-sequence detection: samples then attend to each other. This
    test pins that behaviour so that an upgrade that changes it is noticed.
    """
    tile = _tile(model)
    batch = collate_packed(rows, int(model.config.text_config.pad_token_id), tile, 10**6)  # one bin
    with torch.no_grad():
        ref = packed_logits(model, batch)
        kw = {
            "input_ids": batch["input_ids"],
            "attention_mask": None,
            "position_ids": batch["position_ids"],
            "pixel_values": normalize_pixels(batch["pixel_values"]),  # HF's forward takes normalised floats
        }
        good = model(**kw, use_cache=False).logits
        leaky = model(**kw).logits
    torch.testing.assert_close(good, ref, rtol=0, atol=1e-5)
    assert (leaky - ref).abs().max() > 1e-3


def test_over_budget_row_is_kept(rows: list[dict[str, Any]], model: Any) -> None:
    batch = collate_packed(rows, 0, _tile(model), 8)  # every row is longer than 8 tokens
    assert batch["bins"] == [[i] for i in range(len(rows))]
    assert batch["input_ids"].shape == (len(rows), max(len(r["input_ids"]) for r in rows))
