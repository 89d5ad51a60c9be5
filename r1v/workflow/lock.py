"""One driver per run: a lock held while `r1v run / resume / gc` works on a run directory, and a heartbeat.

The lock is an exclusive `flock` on RUN/.lock, which the kernel releases when the holder dies however it dies
(SIGKILL included), so a stale lock never needs breaking by hand on the host that held it. RUN/driver.json names
the holder (pid, host, start, heartbeat every `HEARTBEAT_S`) for messages and for `status`, which calls a run
`interrupted` when its stages say `running` but no driver holds the lock; from another host (a shared run root)
the holder counts as gone once its heartbeat is older than `STALE_AFTER_S`.

With an object-store run root the flock is on the node-local mirror, so it excludes drivers on this node only; the
heartbeat is published to the store's RUN/driver.json, and a driver that finds another host's heartbeat there,
fresh, refuses to start. That check and the write that follows are not one atomic step (S3 has no lock): two
drivers started on two hosts within one request's time could both proceed; do not resume a run from two places.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from r1v.core import storage
from r1v.core.fs import atomic_write_json, atomic_write_text, read_json

HEARTBEAT_S = 10.0
STALE_AFTER_S = 6 * HEARTBEAT_S


class RunBusy(RuntimeError):
    """Another live driver holds the run."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The recorded holder of the run (maybe dead), or None if no driver ever took it."""
    return read_json(Path(run_dir) / "driver.json", None)


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "an unknown process"
    return (f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}, last heartbeat "
            f"{info.get('heartbeat')})")


def holder_alive(run_dir: Path) -> bool:
    """Whether a driver holds the run now: the flock on this host; the heartbeat for a holder on another host."""
    run_dir = Path(run_dir)
    info = holder(run_dir)
    if info and info.get("host") != socket.gethostname():
        return not info.get("released") and time.time() - float(info.get("beat", 0)) < STALE_AFTER_S
    lock = run_dir / ".lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock this probe may have taken
    return False


class RunLock:
    """`with RunLock(run_dir):` the caller owns the run; a second driver gets RunBusy naming this one."""

    def __init__(self, run_dir: Path, store: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.store = store
        """The run's object-store URI (`run_dir` is its mirror): the heartbeat is published there."""
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.previous: dict[str, Any] | None = None
        """The holder before this one, when it died holding the run (its stages may read `running`)."""

    def acquire(self) -> RunLock:
        if self.store:  # another host's driver is known only from the store's copy
            self.run_dir.mkdir(parents=True, exist_ok=True)
            data = storage.get_bytes(storage.join(self.store, "driver.json"))
            if data is not None:
                atomic_write_text(self.run_dir / "driver.json", data.decode())
        fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(f"run {self.run_dir} is held by another r1v driver: {describe(holder(self.run_dir))}; "
                          "wait for it to end or stop it") from None
        info = holder(self.run_dir)
        if info and info.get("host") != socket.gethostname() and not info.get("released") \
                and time.time() - float(info.get("beat", 0)) < STALE_AFTER_S:
            os.close(fd)
            raise RunBusy(f"run {self.run_dir} is held by an r1v driver on another host: {describe(info)}")
        self.previous = info if info and not info.get("released") else None
        self._fd = fd
        self._info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        self._beat()
        self._thread = threading.Thread(target=self._beat_loop, name="r1v-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self, **extra: Any) -> None:
        info = {**self._info, "heartbeat": _now(), "beat": time.time(), **extra}
        atomic_write_json(self.run_dir / "driver.json", info)
        if self.store:
            storage.put_json(storage.join(self.store, "driver.json"), info)

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            # a full disk or a store outage must not kill the driver; status then says stale
            with contextlib.suppress(OSError):
                self._beat()

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            self._beat(released=_now())
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()
