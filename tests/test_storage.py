"""The object-store layer (`r1v.core.storage`) against moto's S3-compatible server on 127.0.0.1: atomic puts,
directories uploaded with a manifest and downloaded with their checksums checked, a corrupted object refused by
name, and `stage_local` downloading once per node however many processes ask at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
from r1v_test_servers import S3Server

from r1v.core import storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3, request) -> str:
    name = request.node.name.replace("_", "-")[:50].lower().strip("-")
    return s3.create_bucket(name)


def _tree(root: Path) -> Path:
    (root / "model" / "sub").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(3 * 2**20 + 7))
    (root / "model" / "sub" / "config.json").write_text('{"a": 1}\n')
    (root / "counts.json").write_text("{}\n")
    (root / "quarantine").mkdir()  # an output may be an empty directory
    return root


def test_put_get_list_and_paths_pass_through(bucket, tmp_path):
    storage.put_json(f"{bucket}/run/state.json", {"status": "done"})
    assert storage.read_json(f"{bucket}/run/state.json") == {"status": "done"}
    assert storage.get_bytes(f"{bucket}/run/missing") is None and not storage.exists(f"{bucket}/run/missing")
    assert storage.list_files(f"{bucket}/run") == {"state.json": len(b'{\n  "status": "done"\n}\n')}
    assert storage.stage_local(tmp_path / "x") == tmp_path / "x"  # a path is its own local copy
    assert not storage.is_uri(str(tmp_path)) and storage.is_uri(bucket)


def test_a_put_replaces_an_object_whole(bucket):
    uri = f"{bucket}/obj"
    storage.put_bytes(uri, b"a" * 1000)
    storage.put_bytes(uri, b"b" * 10)
    assert storage.get_bytes(uri) == b"b" * 10


def test_upload_writes_the_manifest_last_and_download_checks_it(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("R1V_CACHE", str(tmp_path / "cache"))
    src = _tree(tmp_path / "src")
    entries = storage.upload_dir(src, f"{bucket}/stage")
    assert set(entries) == {"model/weights.bin", "model/sub/config.json", "counts.json", "quarantine/.r1v-keep"}
    assert storage.exists(f"{bucket}/stage/quarantine") and storage.stage_local(f"{bucket}/stage/quarantine").is_dir()
    manifest = storage.read_json(f"{bucket}/stage/{storage.MANIFEST}")
    assert manifest["files"]["counts.json"]["sha256"] == storage.sha256_file(src / "counts.json")
    got = storage.download_dir(f"{bucket}/stage", tmp_path / "dst")
    assert sorted(got) == sorted(entries) and (tmp_path / "dst/quarantine").is_dir()
    assert (tmp_path / "dst/model/weights.bin").read_bytes() == (src / "model/weights.bin").read_bytes()
    # a second upload sends only what changed
    (src / "counts.json").write_text('{"n": 1}\n')
    sent: list[str] = []
    real = storage.upload_file
    try:
        storage.upload_file = lambda p, u: (sent.append(u), real(p, u))  # type: ignore[assignment]
        storage.upload_dir(src, f"{bucket}/stage", skip=entries)
    finally:
        storage.upload_file = real  # type: ignore[assignment]
    assert sent == [f"{bucket}/stage/counts.json"]


def test_a_corrupted_object_is_refused_by_name(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("R1V_CACHE", str(tmp_path / "cache"))
    storage.upload_dir(_tree(tmp_path / "src"), f"{bucket}/stage")
    storage.put_bytes(f"{bucket}/stage/model/weights.bin", b"not the weights")  # replaced behind the manifest
    with pytest.raises(storage.ChecksumError, match=r"stage/model/weights\.bin: sha256 .* does not match"):
        storage.stage_local(f"{bucket}/stage/model")
    with pytest.raises(storage.ChecksumError, match="weights.bin"):
        storage.download_dir(f"{bucket}/stage", tmp_path / "dst")
    assert not list((tmp_path / "cache").rglob("weights.bin"))  # nothing half-checked is left to load


def _stage(args: tuple[str, str]) -> str:
    uri, cache = args
    os.environ["R1V_CACHE"] = cache
    calls = []
    real = storage._fetch

    def counting(u, dest, want):
        calls.append(u)
        real(u, dest, want)

    storage._fetch = counting
    path = storage.stage_local(uri)
    return json.dumps([str(path), len(calls)])


def test_stage_local_downloads_once_per_node_under_concurrency(bucket, tmp_path, monkeypatch):
    storage.upload_dir(_tree(tmp_path / "src"), f"{bucket}/stage")
    cache = str(tmp_path / "cache")
    with mp.get_context("spawn").Pool(4) as pool:
        out = [json.loads(r) for r in pool.map(_stage, [(f"{bucket}/stage/model", cache)] * 4)]
    paths, fetched = {p for p, _ in out}, sum(n for _, n in out)
    assert len(paths) == 1 and fetched == 2  # two files, fetched by one of the four processes
    local = Path(paths.pop())
    assert (local / "weights.bin").read_bytes() == (tmp_path / "src/model/weights.bin").read_bytes()
    # a path staged on one node, handed to another (missing there), is staged there from the store
    os.rename(cache, tmp_path / "elsewhere")  # that node's cache is not on this one
    monkeypatch.setenv("R1V_CACHE", str(tmp_path / "other-node"))
    there = storage.stage_local(local / "sub" / "config.json")
    assert there.read_text() == '{"a": 1}\n' and str(tmp_path / "other-node") in str(there)
    os.rename(tmp_path / "elsewhere", cache)
    # a re-uploaded directory (a stage run again) is staged afresh, beside the old copy
    monkeypatch.setenv("R1V_CACHE", cache)
    (tmp_path / "src/model/sub/config.json").write_text('{"a": 2}\n')
    storage.upload_dir(tmp_path / "src", f"{bucket}/stage")
    assert (storage.stage_local(f"{bucket}/stage/model") / "sub/config.json").read_text() == '{"a": 2}\n'
    assert (local / "sub/config.json").read_text() == '{"a": 1}\n'
