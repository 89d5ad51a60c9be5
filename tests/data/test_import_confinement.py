"""The importer stays inside its image root, never blocks on a file, never hangs on a row, survives a dying
validator, and a killed import leaves nothing behind that the next one does not remove.

Everything is real: FIFOs, symlinks, device nodes, an image slow enough to decode to pass a deadline, worker
processes killed by signals, and `python -m r1v data import` killed with SIGKILL.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_import_helpers import png, write_jsonl

from r1v.data.config import DataImportConfig
from r1v.data.importers.driver import import_corpus
from r1v.data.importers.pool import validate_in_workers
from r1v.data.pipeline import RowError
from r1v.data.schema import read_corpus
from r1v.data.validate import (
    IMAGE_MISSING,
    IMAGE_TOO_LARGE,
    NOT_A_FILE,
    OUTSIDE_ROOT,
    TIMEOUT,
    VALIDATOR_CRASHED,
    LocalImage,
    Outcome,
    Record,
    read_image,
)

ROOT = Path(__file__).resolve().parents[2]


def row(rid: str, *images: str) -> dict:
    return {"id": rid, "images": list(images),
            "messages": [{"role": "user", "content": "<image>" * len(images) + " what is it?"},
                         {"role": "assistant", "content": "red"}]}


def run(tmp: Path, src: Path, **cfg) -> tuple[dict, dict[str, str]]:
    """Import `src` (openai format); (report, {id: reason or "ok"})."""
    out = tmp / "out"
    rep = import_corpus(DataImportConfig(format="openai", source=str(src), **cfg), out / "corpus",
                        out / "q.parquet", out / "report.json", progress=False)
    fate = dict.fromkeys(read_corpus(out / "corpus").column("id").to_pylist(), "ok")
    q = pq.read_table(out / "q.parquet").to_pylist()
    fate.update({r["id"]: r["reason"] for r in q})
    return rep, fate


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """corpus/ (the image root: chat.jsonl's folder) with every kind of path, and a secret/ beside it."""
    root, secret = tmp_path / "corpus", tmp_path / "secret"
    (root / "img").mkdir(parents=True)
    secret.mkdir()
    (root / "img" / "a.png").write_bytes(png())
    (secret / "x.png").write_bytes(png(color=(0, 0, 255)))
    (root / "img" / "alias.png").symlink_to("a.png")
    (root / "img" / "evil.png").symlink_to(secret / "x.png")
    (root / "img" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "img" / "pipe.png")
    (root / "img" / "dir.png").mkdir()
    return write_jsonl(root / "chat.jsonl", [
        row("ok", "img/a.png"),
        row("abs_inside", str(root / "img" / "a.png")),
        row("link_inside", "img/alias.png"),
        row("dotdot", "../secret/x.png"),
        row("dotdot_missing", "../nope.png"),
        row("abs_outside", str(secret / "x.png")),
        row("file_url_outside", f"file://{secret / 'x.png'}"),
        row("link_outside", "img/evil.png"),
        row("second_image_outside", "img/a.png", "img/../../secret/x.png"),
        row("device", "img/zero.png"),
        row("fifo", "img/pipe.png"),
        row("directory", "img/dir.png"),
        row("missing", "img/nope.png"),
    ])


def warm(tmp: Path) -> None:
    """One import first: the timed one then measures reading, not the process's one-off fork server start."""
    (tmp / "warm").mkdir()
    run(tmp / "warm", write_jsonl(tmp / "warm" / "w.jsonl", [row("w")]))


def test_paths_outside_the_root_and_non_files_are_quarantined(tmp_path, corpus) -> None:
    warm(tmp_path)
    t0 = time.monotonic()
    rep, fate = run(tmp_path, corpus)
    assert time.monotonic() - t0 < 60  # a FIFO opened for reading would block here until the test timeout
    assert fate == {"ok": "ok", "abs_inside": "ok", "link_inside": "ok",
                    "dotdot": OUTSIDE_ROOT, "dotdot_missing": OUTSIDE_ROOT, "abs_outside": OUTSIDE_ROOT,
                    "file_url_outside": OUTSIDE_ROOT, "link_outside": OUTSIDE_ROOT,
                    "second_image_outside": OUTSIDE_ROOT, "device": OUTSIDE_ROOT,
                    "fifo": NOT_A_FILE, "directory": NOT_A_FILE, "missing": IMAGE_MISSING}
    assert rep["rows_read"] == 13 and rep["by_reason"][OUTSIDE_ROOT] == 7


def test_allow_outside_root_reads_outside_files_but_never_special_ones(tmp_path, corpus) -> None:
    warm(tmp_path)
    t0 = time.monotonic()
    _, fate = run(tmp_path, corpus, allow_outside_root=True)
    assert time.monotonic() - t0 < 60
    assert fate["dotdot"] == fate["abs_outside"] == fate["link_outside"] == fate["second_image_outside"] == "ok"
    assert fate["dotdot_missing"] == IMAGE_MISSING
    # /dev/zero would be read forever, the FIFO would block: only regular files are opened
    assert fate["device"] == fate["fifo"] == fate["directory"] == NOT_A_FILE


def test_image_root_option_is_the_root(tmp_path, corpus) -> None:
    """With image_root set, relative paths and the confinement follow it, not the JSONL's folder."""
    _, fate = run(tmp_path, corpus, image_root=str(tmp_path / "secret"))
    assert fate["ok"] == IMAGE_MISSING  # img/a.png is not under secret/
    assert fate["abs_outside"] == "ok" and fate["abs_inside"] == OUTSIDE_ROOT


def test_reads_stop_at_the_size_limit(tmp_path) -> None:
    """A file that says it is small (procfs reports 0 bytes) is still read only up to the limit + 1."""
    proc = LocalImage(Path("/proc/self/maps"))
    with pytest.raises(RowError) as e:
        read_image(proc, 16)
    assert e.value.reason == IMAGE_TOO_LARGE and "17 bytes or more" in e.value.detail
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(1 << 40)  # a sparse 1 TiB file: refused from its size, unread
    with pytest.raises(RowError) as e:
        read_image(LocalImage(big, tmp_path), 1 << 20)
    assert e.value.reason == IMAGE_TOO_LARGE


# ------------------------------------------------------------------------------------------------- deadline


def slow_png() -> bytes:
    """A 49-megapixel grey PNG: 50 KB on disk, ~0.05 s of inflating per decode."""
    buf = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_row_past_the_deadline_is_quarantined_as_timeout(tmp_path) -> None:
    """A row whose 300 images take ~15 s to decode, under a 2 s deadline: quarantined, its worker replaced,
    the rows around it (in the same batch) kept."""
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "slow.png").write_bytes(slow_png())
    src = write_jsonl(tmp_path / "chat.jsonl", [row("before", "a.png"), row("slow", *["slow.png"] * 300),
                                                 row("after", "a.png")])
    rep, fate = run(tmp_path, src, row_timeout_s=2.0)
    assert fate == {"before": "ok", "slow": TIMEOUT, "after": "ok"}  # TIMEOUT: the deadline, not the decode, ended it
    detail = pq.read_table(tmp_path / "out" / "q.parquet").column("detail")[0].as_py()
    assert "row_timeout_s=2" in detail and "chat.jsonl:2" in detail


def _init(arg: str) -> str:
    return arg


def _check(state: str, rec: Record, source: str) -> Outcome:
    """A real validator's stand-in whose rows say what to do: die by a signal, hang, or pass."""
    if rec.id.startswith("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    if rec.id.startswith("hang"):
        time.sleep(3600)
    return Outcome(row={"id": rec.id, "state": state, "source": source})


def _records(*ids: str) -> list[Record]:
    return [Record(id=i, location=f"src:{n}") for n, i in enumerate(ids)]


def test_crashed_and_stuck_workers_cost_one_row_each() -> None:
    ids = ("a", "die1", "b", "c", "hang1", "d", "e", "die2", "f")
    t0 = time.monotonic()
    got = list(validate_in_workers(_records(*ids), init=_init, init_arg="S", check=_check, source="src",
                                   workers=2, batch_rows=4, row_timeout_s=2.0))
    assert time.monotonic() - t0 < 30
    assert [r.id for r, _ in got] == list(ids)  # input order, every row once
    reasons = {r.id: o.reason or o.row["state"] for r, o in got}
    assert reasons == {"a": "S", "die1": VALIDATOR_CRASHED, "b": "S", "c": "S", "hang1": TIMEOUT, "d": "S",
                       "e": "S", "die2": VALIDATOR_CRASHED, "f": "S"}
    assert "exit code -9" in dict((r.id, o.detail) for r, o in got)["die1"]


def _bad_init(arg: str) -> str:
    raise ValueError(f"no model at {arg}")


def test_a_worker_that_cannot_start_fails_the_import() -> None:
    with pytest.raises(RuntimeError, match="no model at /nowhere"):
        list(validate_in_workers(_records("a"), init=_bad_init, init_arg="/nowhere", check=_check, source="s"))


# ------------------------------------------------------------------------------------------------- leftovers


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _descendants(pid: int) -> dict[int, int]:
    """{pid: depth} of the live processes below `pid` (its validator workers are children of the fork server
    it started: depth 2)."""
    parent = {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if d.name.isdigit() and stat[0] != "Z":
            parent[int(d.name)] = int(stat[1])
    out: dict[int, int] = {}
    todo = [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.update(dict.fromkeys(kids, depth + 1))
        todo += [(c, depth + 1) for c in kids]
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_a_killed_import_leaves_nothing_the_next_one_keeps(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "slow.png").write_bytes(slow_png())
    src = write_jsonl(tmp_path / "chat.jsonl", [row(f"r{i}", "a.png") for i in range(50)]
                      + [row("slow", *["slow.png"] * 2000)] + [row("last", "a.png")])
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "r1v.cli", "data", "import", "--format", "openai", str(src),
                             "--out", str(out / "c"), "--quiet"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        # mid-import: the corpus temp and the quarantine temp exist and a worker is validating
        while not (len(_hidden(out)) >= 2 and 2 in _descendants(proc.pid).values()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the import never started"
            time.sleep(0.05)
        time.sleep(0.5)
        workers = list(_descendants(proc.pid))
        proc.send_signal(signal.SIGKILL)  # what `timeout -s KILL` does
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    debris = _hidden(out)
    assert any(n.startswith(".c.tmp-") for n in debris) and any(n.startswith(".c.quarantine") for n in debris)
    assert not (out / "c").exists()
    # its validator workers notice and exit instead of decoding for nobody
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, f"orphaned workers still running: {workers}"
        time.sleep(0.1)

    src.write_text("".join(src.read_text().splitlines(keepends=True)[:50]))  # the next import, without the slow row
    import_corpus(DataImportConfig(format="openai", source=str(src)), out / "c", out / "c.quarantine.parquet",
                  out / "c.report.json", progress=False)
    assert _hidden(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["c", "c.quarantine.parquet", "c.report.json"]
    assert read_corpus(out / "c").num_rows == 50


def test_cli_options(tmp_path, corpus, capsys) -> None:
    import argparse

    from r1v.cli.data import add_data_parser

    p = argparse.ArgumentParser(prog="r1v")
    add_data_parser(p.add_subparsers(dest="command", required=True))
    base = ["data", "import", "--format", "openai", str(corpus), "--quiet", "--row-timeout", "30"]
    args = p.parse_args([*base, "--out", str(tmp_path / "a")])
    assert args.fn(args) == 0 and '"outside_root": 7' in capsys.readouterr().out
    args = p.parse_args([*base, "--out", str(tmp_path / "b"), "--allow-outside-root"])
    assert args.fn(args) == 0 and "outside_root" not in capsys.readouterr().out
    args = p.parse_args([*base[:-1], "0", "--out", str(tmp_path / "c")])
    assert args.fn(args) == 2 and "row_timeout_s" in capsys.readouterr().err
