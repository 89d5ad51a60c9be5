"""Atomic file and directory writes: a crash never leaves a half-written checkpoint or record behind.

Temporary names carry their writer (`owner_tag`: host, pid, process start time), so a writer that was killed
(SIGKILL, OOM, a lost node) leaves debris that the next write to the same target can prove dead and remove,
while a live writer's temporary, on this host or another one sharing the file system, is never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

_TAG_RE = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-")


@cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _proc_stat(pid: int) -> tuple[str, int]:
    """(state, start time in clock ticks since boot) of a process (Linux), ("", 0) where it cannot be read.
    With the pid the start time names one process, so a pid reused by an unrelated process does not pass for
    the writer; state "Z" is a process that is dead but not yet reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return "", 0


def _start_time(pid: int) -> int:
    return _proc_stat(pid)[1]


def owner_tag() -> str:
    """`HOST-PID-START-`: who owns a temporary name; `is_dead_owner` reads it back."""
    pid = os.getpid()
    return f"{_host()}-{pid}-{_start_time(pid)}-"


def is_dead_owner(tag: str) -> bool:
    """True only when the writer named by an `owner_tag` provably no longer runs: it ran on this host and its
    pid is gone or now names a process that started at another time. Another host's writer is never dead."""
    m = _TAG_RE.match(tag)
    if m is None or m["host"] != _host():
        return False
    pid, start = int(m["pid"]), int(m["start"])
    if pid == os.getpid():
        return start != _start_time(pid) and start != 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        pass
    state, now = _proc_stat(pid)
    return state == "Z" or bool(start and now and now != start)


def remove_stale(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the entries `PREFIX<owner_tag>...SUFFIX` of `parent` whose writer is dead; returns them."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(suffix)):
            continue
        if not is_dead_owner(e.name[len(prefix):]):
            continue
        p = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.", ".tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def clean_directory_debris(target: Path) -> None:
    """Remove what killed `atomic_directory` writers of `target` left: their temporaries, and their moved-aside
    old copies, after putting one back when the writer died between moving it aside and the swap (so `target`
    never stays missing)."""
    old_prefix = f".{target.name}.old-"
    if not target.exists():
        for e in sorted(target.parent.glob(f"{old_prefix}*")):
            if is_dead_owner(e.name[len(old_prefix):]) and (e / target.name).is_dir():
                os.replace(e / target.name, target)
                break
    remove_stale(target.parent, f".{target.name}.tmp-")
    remove_stale(target.parent, old_prefix)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` by rename.

    The old copy is moved aside first and removed only after the swap, and put back if the swap fails, so at
    every moment `path` is either the complete old version or the complete new one. Debris of writers of the
    same `path` that were killed is removed first (`clean_directory_debris`).
    """
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_directory_debris(target)
    tag = owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{tag}", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{tag}", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing, never removed: removing a lock file lets a
    later process lock a new inode while another still holds the old one). The kernel drops it when the
    holder dies, so a killed holder never blocks the others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
