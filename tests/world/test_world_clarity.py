"""The world's clarity option: images blurred per row, so that QDAM's image cue carries information."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from r1v.distill.cues import decode_image, image_cues
from r1v.world.config import ClarityConfig, WorldDataConfig
from r1v.world.corpora import generate


def _decodes(data: bytes) -> bool:
    try:
        decode_image(data)
    except Exception:  # noqa: BLE001
        return False
    return True


KW = {"n_align": 24, "n_sft": 60, "n_grpo": 9, "n_test": 30, "seed": 4}


def test_clarity_blurs_images_per_row_and_leaves_everything_else(tmp_path) -> None:
    cfg = ClarityConfig()
    plain = generate(tmp_path / "a", **KW)
    clear = generate(tmp_path / "b", **KW, clarity=cfg, corrupt_rows=2)
    plain_c = generate(tmp_path / "c", **KW, corrupt_rows=2)
    for name in ("align", "sft", "grpo", "test"):
        a, b = pq.read_table(plain_c[name]).to_pylist(), pq.read_table(clear[name]).to_pylist()
        radii = []
        for x, y in zip(a, b, strict=True):
            assert (x["id"], x["messages"], x["answer"]) == (y["id"], y["messages"], y["answer"])
            meta = json.loads(y["meta"])
            radii.append(meta.pop("blur"))
            assert meta == json.loads(x["meta"])
            if not _decodes(y["images"][0]):  # corrupted (after the blur: a truncated blurred image)
                continue
            if radii[-1] == 0:
                assert y["images"] == x["images"]
            else:
                assert y["images"] != x["images"]
        assert set(radii) <= set(cfg.blur)
        if len(radii) >= 24:
            assert set(radii) == set(cfg.blur), (name, radii)
    # the corrupted alignment rows stay corrupt (the quarantine still sees them)
    broken = [r for r in pq.read_table(clear["align"]).to_pylist() if not _decodes(r["images"][0])]
    assert len(broken) == 2 and all(json.loads(r["meta"])["blur"] in cfg.blur for r in broken)
    # and without the option the corpora are what they were
    assert pq.read_table(plain["sft"]).equals(pq.read_table(generate(tmp_path / "d", **KW)["sft"]))


def test_the_image_cue_orders_rows_by_their_clarity(tmp_path) -> None:
    """What QDAM's image score needs from the world: a sharper image scores higher, every time (the radii are
    far enough apart that the render noise never reverses two levels)."""
    rows = pq.read_table(generate(tmp_path, **KW, clarity=ClarityConfig())["sft"]).to_pylist()
    by: dict[float, list[float]] = {}
    for r in rows:
        by.setdefault(json.loads(r["meta"])["blur"], []).append(image_cues(decode_image(r["images"][0]))["cue"])
    levels = sorted(by)
    assert len(levels) == 3
    for sharper, blurrier in zip(levels, levels[1:], strict=False):
        assert min(by[sharper]) > max(by[blurrier]), (sharper, blurrier)
    # without clarity the cue spreads far less than across the levels: render noise only
    plain = pq.read_table(generate(tmp_path / "plain", **KW)["sft"]).to_pylist()
    cues = [image_cues(decode_image(r["images"][0]))["cue"] for r in plain]
    assert max(cues) - min(cues) < (min(by[levels[0]]) - max(by[levels[-1]])) / 4


def test_clarity_config_is_checked_and_off_by_default() -> None:
    assert "clarity" not in WorldDataConfig().model_dump()
    assert WorldDataConfig(clarity={}).clarity.blur == [0.0, 0.6, 1.2]
    for bad in ([], [-1.0], [9.0]):
        with pytest.raises(ValueError, match="blur"):
            ClarityConfig(blur=bad)
