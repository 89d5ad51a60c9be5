"""A fuzzed LLaVA corpus: every kind of broken row the issue lists, each quarantined under its reason, and
no good row lost. The counts are exact: the corpus is built here, so every row's fate is known."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_import_helpers import (
    BROKEN_REASON,
    broken_images,
    odd_mode_images,
    png,
    tiny_model_dir,
    write_json,
    write_jsonl,
)

from r1v.data.config import DataImportConfig
from r1v.data.importers.driver import import_corpus
from r1v.data.schema import read_corpus

LONG = "step " * 300  # ~300+ tokens: over max_length=256 with the tiny tokenizer


def conv(*turns: str, roles: tuple[str, ...] = ("human", "gpt")) -> list[dict]:
    return [{"from": roles[i % len(roles)], "value": t} for i, t in enumerate(turns)]


def fuzz_corpus(root: Path) -> tuple[list[dict], dict[str, str | None]]:
    """(rows, {id: expected reason, None for good rows}); images are written under root/img."""
    img = root / "img"
    img.mkdir(parents=True)
    (img / "ok.png").write_bytes(png())
    (img / "ok2.jpg").write_bytes(png(30, 20))  # PNG bytes behind a .jpg name: a wrong extension is fine
    for name, data in {**odd_mode_images(), **broken_images()}.items():
        (img / name).write_bytes(data)
    rows, expect = [], {}

    def add(rid: str, reason: str | None, **row) -> None:
        rows.append({"id": rid, **row})
        expect[rid] = reason

    for i in range(10):
        add(f"good-{i}", None, image="ok.png", conversations=conv("<image>\nWhat is shown?", f"A box {i}."))
    add("good-text-0", None, conversations=conv("What is 2+2?", "4"))
    add("good-text-1", None, conversations=conv("Say hi", "hi"))
    add("good-multi-0", None, image=["ok.png", "ok2.jpg"], conversations=conv("<image> vs <image>", "same"))
    add("good-multi-1", None, image=["ok2.jpg", "ok.png"], conversations=conv("<image>", "x", "<image>", "y"))
    for name in odd_mode_images():
        add(f"good-mode-{name}", None, image=name, conversations=conv("<image> describe", "a flat colour"))
    add("good-wrong-ext", None, image="ok2.jpg", conversations=conv("<image> what?", "a box"))
    add("good-system", None, image="ok.png",
        conversations=conv("be brief", "<image> q", "a", roles=("system", "human", "gpt")))
    # fits only without its last exchange: too_long under on_too_long=drop, truncated under truncate
    add("long-multi-turn", "too_long", image="ok.png", conversations=conv("<image> q", "a", "more?", LONG))

    for name in broken_images():
        add(f"bad-{name}", BROKEN_REASON[name.split("-")[0]], image=name,
            conversations=conv("<image> q", "a"))
    add("bad-missing-0", "image_missing", image="nope.png", conversations=conv("<image> q", "a"))
    add("bad-missing-1", "image_missing", image=["ok.png", "sub/nope.jpg"],
        conversations=conv("<image><image>", "a"))
    add("bad-no-marker-0", "image_markers", image="ok.png", conversations=conv("what is this?", "a box"))
    add("bad-no-marker-1", "image_markers", image=["ok.png", "ok.png"], conversations=conv("<image> q", "a"))
    add("bad-extra-marker", "image_markers", image="ok.png", conversations=conv("<image> <image> q", "a"))
    add("bad-marker-no-image", "image_markers", conversations=conv("<image> q", "a"))
    add("bad-empty-answer", "empty_turn", image="ok.png", conversations=conv("<image> q", ""))
    add("bad-blank-answer", "empty_turn", image="ok.png", conversations=conv("<image> q", "  \n "))
    add("bad-blank-question", "empty_turn", conversations=conv("   ", "a"))
    add("bad-gpt-first", "roles", conversations=conv("a", "q", roles=("gpt", "human")))
    add("bad-two-humans", "roles", conversations=conv("q1", "q2", "a", roles=("human", "human", "gpt")))
    add("bad-unknown-role", "roles", conversations=conv("q", "a", roles=("narrator", "gpt")))
    add("bad-unanswered", "roles", image="ok.png", conversations=conv("<image> q", "a", "and?"))
    add("bad-too-long-0", "too_long", image="ok.png", conversations=conv("<image> q", LONG))
    add("bad-too-long-1", "too_long", conversations=conv(LONG, "a"))
    add("bad-no-conversations", "bad_record", image="ok.png")
    add("bad-conversations-type", "bad_record", conversations="human: hi")
    return rows, expect


GOOD = 22
EXPECTED_BY_REASON = {"bad_record": 2, "empty_turn": 3, "image_decode": 4, "image_empty": 2,
                      "image_markers": 4, "image_missing": 2, "image_too_large": 2, "roles": 4, "too_long": 3}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return tiny_model_dir(tmp_path_factory)


def _import(root: Path, src: Path, **kw) -> tuple[dict, list[dict], list[dict]]:
    cfg = DataImportConfig(format="llava", source=str(src), image_root=str(root / "img"),
                           preprocess={"max_length": 256}, rows_per_file=7, **kw)
    rep = import_corpus(cfg, root / "corpus", root / "q.parquet", root / "report.json", progress=False)
    return rep, read_corpus(root / "corpus").to_pylist(), pq.read_table(root / "q.parquet").to_pylist()


def test_fuzz_llava_json_exact_counts(tmp_path, tiny_model) -> None:
    rows, expect = fuzz_corpus(tmp_path)
    assert len(rows) == 48 and sum(r is None for r in expect.values()) == GOOD
    assert Counter(r for r in expect.values() if r) == EXPECTED_BY_REASON
    rep, out, q = _import(tmp_path, write_json(tmp_path / "fuzz.json", rows), model=tiny_model)

    assert rep["rows_read"] == 48 and rep["rows_written"] == 22 and rep["rows_quarantined"] == 26
    assert rep["by_reason"] == EXPECTED_BY_REASON and rep["reconciled"] is True
    assert rep["images_converted"] == 6 and rep["rows_truncated"] == 0 and rep["corpus_files"] == 4
    assert [r["id"] for r in out] == [k for k, v in expect.items() if v is None]  # no good row lost, in order
    assert {r["id"]: r["reason"] for r in q} == {k: v for k, v in expect.items() if v is not None}
    pos = {r["id"]: i for i, r in enumerate(rows)}
    assert all(r["source"] == f"{tmp_path / 'fuzz.json'}:#{pos[r['id']]}" for r in q)
    assert len(list((tmp_path / "corpus").glob("part-*.parquet"))) == 4  # 22 rows, 7 per file


def test_fuzz_jsonl_truncate_policy_parallel(tmp_path, tiny_model) -> None:
    """Same corpus as JSONL, two validation processes, on_too_long=truncate: the over-long multi-turn row is
    cut back to its first exchange; single-exchange over-long rows are still quarantined."""
    rows, expect = fuzz_corpus(tmp_path)
    rep, out, q = _import(tmp_path, write_jsonl(tmp_path / "fuzz.jsonl", rows), model=tiny_model,
                          on_too_long="truncate", workers=2, batch_rows=4)
    assert rep["rows_read"] == 48 and rep["rows_written"] == 23 and rep["rows_quarantined"] == 25
    assert rep["by_reason"] == {**EXPECTED_BY_REASON, "too_long": 2} and rep["rows_truncated"] == 1
    expect["long-multi-turn"] = None
    assert [r["id"] for r in out] == [k for k, v in expect.items() if v is None]
    assert {r["id"]: r["reason"] for r in q} == {k: v for k, v in expect.items() if v is not None}
    truncated = next(r for r in out if r["id"] == "long-multi-turn")
    assert [m["content"] for m in truncated["messages"]] == ["<image> q", "a"]
    assert json.loads(truncated["meta"])["truncated_turns"] == 2
    pos = {r["id"]: i for i, r in enumerate(rows)}
    assert all(r["source"] == f"{tmp_path / 'fuzz.jsonl'}:{pos[r['id']] + 1}" for r in q)


def test_fuzz_without_model_skips_the_length_check(tmp_path) -> None:
    rows, _ = fuzz_corpus(tmp_path)
    rep, out, q = _import(tmp_path, write_json(tmp_path / "fuzz.json", rows))
    assert rep["length_checked"] is False
    assert rep["rows_written"] == GOOD + 3 and rep["rows_quarantined"] == 23
    assert rep["by_reason"] == {k: v for k, v in EXPECTED_BY_REASON.items() if k != "too_long"}


@pytest.mark.parametrize("limit", [1, 17])
def test_limit(tmp_path, limit) -> None:
    rows, _ = fuzz_corpus(tmp_path)
    rep, _, _ = _import(tmp_path, write_json(tmp_path / "fuzz.json", rows), limit=limit)
    assert rep["rows_read"] == limit
