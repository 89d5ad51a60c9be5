"""Which checkpoint a restarted worker group resumes from: the newest one whose every rank's part is written, even
when Ray Train never registered it (its writer died first), and never a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs

from r1v.train.checkpoint import newest_complete


def _ckpt(base: Path, name: str, step: int, world: int = 2, ranks_done: int | None = None,
          missing: str | None = None, mtime: float | None = None) -> str:
    d = base / name
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, "world_size": world, "state": {}}))
    for r in range(world if ranks_done is None else ranks_done):
        (d / f"part-{r}.bin").write_bytes(b"x" * 10)
        listed = [f"part-{r}.bin"] + (["state.json"] if r == 0 else [])
        (d / f"sha256-rank-{r}.txt").write_text("".join(f"{'0' * 64}  {rel}\n" for rel in listed))
    if missing:
        (d / missing).unlink()
    if mtime is not None:
        os.utime(d / "state.json", (mtime, mtime))
    return str(d)


def test_an_unregistered_complete_checkpoint_newer_than_the_registered_one_is_taken(tmp_path):
    fs = pafs.LocalFileSystem()
    reg = _ckpt(tmp_path, "step-000002", 2)
    four = _ckpt(tmp_path, "step-000004", 4)
    assert newest_complete(fs, str(tmp_path), reg) == four
    assert newest_complete(fs, str(tmp_path), four) is None  # the registered one is the newest
    assert newest_complete(fs, str(tmp_path), None) == four  # nothing registered yet


def test_a_checkpoint_missing_a_rank_or_a_file_is_not_taken(tmp_path):
    fs = pafs.LocalFileSystem()
    reg = _ckpt(tmp_path, "step-000002", 2)
    _ckpt(tmp_path, "step-000004", 4, ranks_done=1)  # rank 1 died before writing its part
    _ckpt(tmp_path, "step-000006", 6, missing="part-1.bin")  # listed, not there
    _ckpt(tmp_path, "step-000008", 8, missing="state.json")
    assert newest_complete(fs, str(tmp_path), reg) is None
    assert newest_complete(fs, str(tmp_path / "nothing-here"), None) is None


def test_at_the_same_step_the_later_written_wins(tmp_path):
    fs = pafs.LocalFileSystem()
    reg = _ckpt(tmp_path, "step-000016", 16, mtime=1_000_000)
    end = _ckpt(tmp_path, "epoch-000-end", 16, mtime=1_000_100)
    assert newest_complete(fs, str(tmp_path), reg) == end
    assert newest_complete(fs, str(tmp_path), end) is None
