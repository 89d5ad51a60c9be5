"""Each importer on a fixture it builds, broken rows included; counts reconcile exactly."""

import base64
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_import_helpers import jpeg, png, write_json, write_jsonl

from r1v.data.config import DataImportConfig
from r1v.data.importers.driver import import_corpus
from r1v.data.schema import read_corpus

SHARED_MATHV = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks" / "mathv"


def run(tmp: Path, **cfg) -> tuple[dict, list[dict], dict[str, str]]:
    """Import; return the report, the corpus rows, and {id: reason} of the quarantine."""
    c = DataImportConfig(**cfg)
    rep = import_corpus(c, tmp / "out" / "corpus", tmp / "out" / "q.parquet", tmp / "out" / "report.json",
                        progress=False)
    assert json.loads((tmp / "out" / "report.json").read_text()) == rep
    q = pq.read_table(tmp / "out" / "q.parquet").to_pylist()
    assert rep["rows_read"] == rep["rows_written"] + rep["rows_quarantined"]
    assert rep["rows_quarantined"] == len(q) == sum(rep["by_reason"].values())
    rows = read_corpus(tmp / "out" / "corpus").to_pylist()
    assert len(rows) == rep["rows_written"]
    return rep, rows, {r["id"]: r["reason"] for r in q}


def conv(q: str, a: str = "<think>\nok</think> 1") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_llava_json(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    (tmp_path / "imgs" / "b.jpg").write_bytes(jpeg())
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"nope")
    rows = [
        {"id": "one", "image": "a.png", "conversations": conv("<image>\nWhat?"), "extra": 5},
        {"id": "two", "image": ["a.png", "b.jpg"], "conversations": conv("<image> and <image>")},
        {"id": "text", "conversations": conv("Just text")},
        {"id": "missing", "image": "zzz.png", "conversations": conv("<image>")},
        {"id": "bad", "image": "bad.jpg", "conversations": conv("<image>")},
        {"id": "noconv", "image": "a.png"},
        [1, 2],
    ]
    write_json(tmp_path / "data.json", rows)
    rep, out, q = run(tmp_path, format="llava", source=str(tmp_path / "data.json"),
                      image_root=str(tmp_path / "imgs"))
    assert [r["id"] for r in out] == ["one", "two", "text"]
    assert q == {"missing": "image_missing", "bad": "image_decode", "noconv": "bad_record",
                 "data-6": "bad_record"}
    assert out[0]["images"][0] == png() and out[0]["source"] == "data"
    assert out[1]["messages"][0] == {"role": "user", "content": "<image> and <image>"}
    meta = json.loads(out[0]["meta"])
    assert meta == {"extra": 5, "origin": f"{tmp_path / 'data.json'}:#0"}
    qsrc = pq.read_table(tmp_path / "out" / "q.parquet").to_pylist()
    assert qsrc[0]["source"] == f"{tmp_path / 'data.json'}:#3" and "zzz.png" in qsrc[0]["detail"]


def test_openai_jsonl(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(png())
    url = "data:image/png;base64," + base64.b64encode(png(20, 20)).decode()
    lines = [
        {"id": "parts", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": " and "},
                                         {"type": "image_url", "image_url": {"url": "a.png"}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Two."}]}]},
        {"id": "sharegpt", "messages": [{"role": "user", "content": "<image>Hi"},
                                        {"role": "assistant", "content": "Hello"}], "images": ["a.png"]},
        {"id": "remote", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]},
            {"role": "assistant", "content": "x"}]},
        {"id": "badurl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]},
            {"role": "assistant", "content": "x"}]},
        {"id": "toolcall", "messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": None}]},
        "{not json",
    ]
    write_jsonl(tmp_path / "chat.jsonl", lines)
    rep, out, q = run(tmp_path, format="openai", source=str(tmp_path / "chat.jsonl"))
    assert [r["id"] for r in out] == ["parts", "sharegpt"]
    assert out[0]["messages"][1]["content"] == "Look: <image> and <image>"
    assert out[0]["images"] == [png(20, 20), png()]
    assert q == {"remote": "image_missing", "badurl": "image_decode", "toolcall": "empty_turn",
                 "chat-5": "bad_record"}


def _tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw[:cut] if cut else raw)


def test_webdataset(tmp_path) -> None:
    js = lambda q: json.dumps({"conversations": conv(q)}).encode()  # noqa: E731
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "s-000.tar", [
        ("s/000.json", js("<image> q")), ("s/000.jpg", jpeg()),
        ("s/001.json", js("<image><image> q")), ("s/001.1.png", png(10, 10)), ("s/001.0.png", png(20, 20)),
        ("s/002.jpg", jpeg()),                                        # no json
        ("s/003.json", js("<image> q")), ("s/003.jpg", b"\xff\xd8broken"),
        ("s/004.json", b"{oops"), ("s/004.png", png()),
        ("s/005.json", json.dumps({"question": "What?", "answer": "7"}).encode()), ("s/005.png", png()),
    ])
    big = [(f"t/{i:03d}.json", js("<image> q")) for i in range(3)] + [("t/003.png", png(200, 200, seed=3))]
    members = [m for i in range(3) for m in (big[i], (f"t/{i:03d}.png", png()))]
    members += [("t/003.json", js("<image>")), big[3]]
    _tar(tmp_path / "shards" / "s-001.tar", members, cut=4 * 1024 + 512 + 10)  # breaks inside t/002.json
    rep, out, q = run(tmp_path, format="webdataset", source=str(tmp_path / "shards"))
    assert [r["id"] for r in out] == ["s/000", "s/001", "s/005", "t/000", "t/001"]
    assert out[1]["images"] == [png(20, 20), png(10, 10)]  # .0.png before .1.png
    assert out[2]["messages"][0]["content"] == "<image>\nWhat?" and out[2]["answer"] == "7"
    assert sorted(q.values()) == ["bad_record", "bad_record", "bad_record", "image_decode"]
    assert q["s/002"] == "bad_record" and q["s/003"] == "image_decode" and q["s/004"] == "bad_record"
    assert rep["rows_read"] == 9 and q["s-001.tar@t/002.json"] == "bad_record"


def _img(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def test_parquet_image_structs(tmp_path) -> None:
    (tmp_path / "side.png").write_bytes(png(11, 11))
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    mmmu = pa.table({
        "id": ["validation_1", "validation_2", "validation_3", "validation_4"],
        "question": ["<image 1> vs <image 2>?", "Which?", "Where?", "Broken?"],
        "options": ["['A cat', 'A dog']", "[]", "[]", "[]"],
        "answer": ["A", "B", "C", "D"],
        "image_1": pa.array([_img(png()), _img(None, "side.png"), None, _img(b"garbage")], img_t),
        "image_2": pa.array([_img(jpeg()), None, None, None], img_t),
        "subject": ["Art", "Art", "Art", "Art"],
    })
    (tmp_path / "mmmu" / "Art").mkdir(parents=True)
    pq.write_table(mmmu, tmp_path / "mmmu" / "Art" / "validation-00000.parquet")
    rep, out, q = run(tmp_path, format="parquet", source=str(tmp_path / "mmmu"), image_root=str(tmp_path))
    assert [r["id"] for r in out] == ["validation_1", "validation_2", "validation_3"]
    content = "<image><image>\n<image 1> vs <image 2>?\nOptions:\nA. A cat\nB. A dog"
    assert out[0]["messages"][0]["content"] == content
    assert out[0]["images"] == [png(), jpeg()] and out[1]["images"] == [png(11, 11)]
    assert out[2]["images"] == []
    assert json.loads(out[0]["meta"])["subject"] == "Art"
    assert q == {"validation_4": "image_decode"}


def test_parquet_conversations_with_image_list(tmp_path) -> None:
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn_t = pa.struct([("from", pa.string()), ("value", pa.string())])
    t = pa.table({
        "id": ["a", "b", "c"],
        "images": pa.array([[_img(png()), _img(png(5, 5))], [_img(png())], []], pa.list_(img_t)),
        "conversations": pa.array([conv("<image><image>x"), conv("no marker"), conv("text only")],
                                  pa.list_(turn_t)),
    })
    pq.write_table(t, tmp_path / "ov.parquet", row_group_size=2)
    rep, out, q = run(tmp_path, format="parquet", source=str(tmp_path / "ov.parquet"), batch_rows=1)
    assert [r["id"] for r in out] == ["a", "c"] and q == {"b": "image_markers"}
    assert out[0]["images"] == [png(), png(5, 5)]


def test_jsonl_folder(tmp_path) -> None:
    (tmp_path / "bench" / "images").mkdir(parents=True)
    (tmp_path / "bench" / "images" / "1.jpg").write_bytes(jpeg())
    (tmp_path / "bench" / "images" / "3.jpg").write_bytes(b"")
    write_jsonl(tmp_path / "bench" / "testmini.jsonl", [
        {"id": "1", "question": "Count?\n<image1>", "options": [], "answer": "6", "image": "images/1.jpg",
         "level": 1},
        {"id": "2", "question": "Pick\n<image1>", "options": ["A", "B"], "answer": "B",
         "image": "images/2.jpg"},
        {"id": "3", "question": "Empty?", "options": [], "answer": "1", "image": "images/3.jpg"},
        {"id": "4", "question": "No answer?", "options": [], "answer": None, "image": "images/1.jpg"},
        {"id": "5", "question": "Text only", "answer": "2"},
    ])
    rep, out, q = run(tmp_path, format="jsonl_folder", source=str(tmp_path / "bench"))
    assert [r["id"] for r in out] == ["1", "5"]
    assert out[0]["messages"] == [{"role": "user", "content": "<image>\nCount?\n<image1>"}]
    assert out[0]["answer"] == "6" and out[0]["source"] == "bench"
    assert q == {"2": "image_missing", "3": "image_empty", "4": "empty_turn"}


@pytest.mark.skipif(not (SHARED_MATHV / "testmini.jsonl").exists(), reason="no shared MATH-Vision data")
def test_jsonl_folder_real_mathv(tmp_path) -> None:
    rep, out, q = run(tmp_path, format="jsonl_folder", source=str(SHARED_MATHV / "testmini.jsonl"))
    assert rep["rows_read"] == rep["rows_written"] == 304 and q == {}
    assert all(r["messages"][0]["content"].startswith("<image>\n") and len(r["images"]) == 1 for r in out)


def test_missing_source_fails_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no .jsonl/.json files"):
        run(tmp_path, format="openai", source=str(tmp_path / "nothing*.jsonl"))
    assert not (tmp_path / "out" / "corpus").exists() and not (tmp_path / "out" / "q.parquet").exists()
    assert not list((tmp_path / "out").iterdir())
