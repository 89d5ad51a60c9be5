"""Killed writers' debris (`atomic_directory`, `atomic_write_text`) is removed by the next write to the same
target, and only when its writer is provably dead: a live writer's temporary, here or on another host, stays.

The writers are real processes, killed with SIGKILL while their temporaries exist.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from r1v.core.fs import atomic_directory, atomic_write_text, clean_directory_debris, is_dead_owner, owner_tag

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys, time
from r1v.core.fs import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "f").write_text(sys.argv[2])
    print(tmp, flush=True)
    time.sleep(600)
"""
TAGGER = "from r1v.core.fs import owner_tag; print(owner_tag(), flush=True); import time; time.sleep(600)"


def _python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            _kill(p)


def test_killed_directory_writer_debris_goes_live_writer_temp_stays(tmp_path, procs) -> None:
    target = tmp_path / "model"
    with atomic_directory(target) as t:
        (t / "f").write_text("v1")
    dead, live = _python(WRITER, str(target), "dead"), _python(WRITER, str(target), "live")
    procs += [dead, live]
    dead_tmp, live_tmp = Path(dead.stdout.readline().strip()), Path(live.stdout.readline().strip())
    assert dead_tmp.is_dir() and live_tmp.is_dir() and dead_tmp.name.startswith(".model.tmp-")
    _kill(dead)  # what a lost node or `kill -9` does: no cleanup runs

    with atomic_directory(target) as t:
        (t / "f").write_text("v2")
    assert (target / "f").read_text() == "v2"
    assert not dead_tmp.exists()
    assert (live_tmp / "f").read_text() == "live"  # a concurrent writer is never disturbed
    _kill(live)
    with atomic_directory(target) as t:
        (t / "f").write_text("v3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_writer_killed_between_move_aside_and_swap_gets_its_old_copy_back(tmp_path, procs) -> None:
    """Killed after moving `target` aside and before the swap, a writer leaves `target` missing: the next
    look restores the complete old copy rather than leaving no version at all."""
    p = _python(TAGGER)
    procs.append(p)
    tag = p.stdout.readline().strip()
    _kill(p)
    target = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.old-{tag}abcd1234"
    (old / "ckpt").mkdir(parents=True)
    (old / "ckpt" / "weights").write_text("old")
    (tmp_path / f".ckpt.tmp-{tag}efgh5678").mkdir()
    clean_directory_debris(target)
    assert (target / "weights").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_write_text_removes_dead_writers_temps_only(tmp_path, procs) -> None:
    dead, live = _python(TAGGER), _python(TAGGER)
    procs += [dead, live]
    dead_tag, live_tag = dead.stdout.readline().strip(), live.stdout.readline().strip()
    _kill(dead)
    names = {"dead": f".state.json.{dead_tag}k2j4h5g6.tmp", "live": f".state.json.{live_tag}a1b2c3d4.tmp",
             "mine": f".state.json.{owner_tag()}z9y8x7w6.tmp",  # this process, another thread's write
             "other_host": ".state.json.0badc0de-1-1-q1w2e3r4.tmp",
             "untagged": ".state.json.ab12cd34.tmp",  # a writer's name from before tags: nobody to ask
             "other_file": f".other.json.{dead_tag}k2j4h5g6.tmp"}
    for n in names.values():
        (tmp_path / n).write_text("partial")
    atomic_write_text(tmp_path / "state.json", "{}")
    left = {k for k, n in names.items() if (tmp_path / n).exists()}
    assert left == {"live", "mine", "other_host", "untagged", "other_file"}
    assert (tmp_path / "state.json").read_text() == "{}"


def test_owner_tags(procs) -> None:
    mine = owner_tag()
    host, pid, start, _ = mine.split("-")
    assert int(pid) == os.getpid() and not is_dead_owner(mine)
    assert is_dead_owner(f"{host}-{pid}-{int(start) + 1}-")  # our pid, an earlier process's start time
    assert not is_dead_owner(f"{'0' * 8}-999999999-1-")  # another host: unknowable here
    assert not is_dead_owner("not-a-tag")
