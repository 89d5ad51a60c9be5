"""Row validation in worker processes, each row under a deadline, in input order and with bounded memory.

Why processes even for one worker: a row can stall its validator where nothing in the process can interrupt
it (a read from a hung network mount, a decoder looping in C), and a native crash takes its process down. The
parent watches each worker from outside: a row that runs past `row_timeout_s` is quarantined as `timeout` and
its worker killed; a worker that dies quarantines its current row as `validator_crashed`. Either way a fresh
worker takes the rest of the batch, so one bad file costs one row, not the import. Workers come from a fork
server (a plain fork is unsafe: the parent may hold threads, tqdm's, pyarrow's, Ray's), which imports the
validator's modules once per process: a worker starts in milliseconds after the first.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from r1v.core.fs import is_dead_owner, owner_tag
from r1v.data.validate import TIMEOUT, VALIDATOR_CRASHED, Outcome, Record

Init = Callable[[Any], Any]
"""Runs once in each worker: `init(init_arg)` -> the worker's state (a `Validator`)."""
Check = Callable[[Any, Record, str], Outcome]
"""`check(state, record, source)` -> the record's Outcome; a picklable module-level function."""


def _exit_with(importer: str) -> None:
    """Exit once the import (an `owner_tag`) is gone: a killed import must not leave its workers decoding for
    nobody. Not the parent pid: a worker's parent is the fork server, which in turn waits for its workers."""
    while not is_dead_owner(importer):
        time.sleep(0.5)
    os._exit(1)


def _serve(conn: Connection, importer: str, init: Init, init_arg: Any, check: Check, source: str) -> None:
    threading.Thread(target=_exit_with, args=(importer,), daemon=True).start()
    try:
        state = init(init_arg)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for rec in batch:
            try:
                out = check(state, rec, source)
            except Exception:  # a bug, not a bad row: the import stops and says where
                conn.send(("error", f"{rec.location}: {traceback.format_exc()}"))
                return
            conn.send(("row", out))


@dataclass
class _Task:
    batch: int
    start: int  # index in the batch of the task's first record
    records: list[Record]


class _Worker:
    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *args), daemon=True, name="r1v-validate")
        self.proc.start()
        child.close()
        self.ready = False
        self.task: _Task | None = None
        self.done = 0  # records of `task` answered
        self.since = time.monotonic()  # start of the current row (or of the start-up)

    def assign(self, task: _Task) -> None:
        self.task, self.done, self.since = task, 0, time.monotonic()
        self.conn.send(task.records)

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                kill = True
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
        # a process stuck in an uninterruptible read dies only when the read returns: do not wait for it
        self.proc.join(timeout=1)
        self.conn.close()


def validate_in_workers(records: Iterable[Record], *, init: Init, init_arg: Any, check: Check, source: str,
                        workers: int = 1, batch_rows: int = 64, row_timeout_s: float = 60.0,
                        startup_timeout_s: float | None = None,
                        preload: Sequence[str] = ()) -> Iterator[tuple[Record, Outcome]]:
    """(record, outcome) for every record, in input order; at most `2 * workers` batches held at a time.

    `preload`: modules the fork server imports once, so that each worker (and each replacement after a
    timeout or a crash) starts in milliseconds rather than importing them again.

    A worker that fails to start (its `init` raises, it dies, or it is not ready within `startup_timeout_s`,
    default max(120 s, 2 x row_timeout_s)) fails the import: that is the configuration, not a row. So does a
    `check` that raises: validators return quarantine verdicts, an exception is a bug.
    """
    startup = startup_timeout_s or max(120.0, 2 * row_timeout_s)
    ctx = multiprocessing.get_context("forkserver")
    # the first pool of a process decides what its fork server imports; workers then fork from it ready
    ctx.set_forkserver_preload([__name__, *preload])
    args = (owner_tag(), init, init_arg, check, source)
    batches: dict[int, list[Record]] = {}
    outcomes: dict[int, list[Outcome | None]] = {}
    answered: dict[int, int] = {}
    todo: deque[_Task] = deque()
    it = iter(records)
    exhausted = False
    ids = itertools.count()
    next_out = 0
    pool = [_Worker(ctx, args) for _ in range(max(1, workers))]

    def settle(w: _Worker, out: Outcome) -> None:
        assert w.task is not None
        b = w.task.batch
        outcomes[b][w.task.start + w.done] = out
        answered[b] += 1
        w.done += 1
        w.since = time.monotonic()
        if w.done == len(w.task.records):
            w.task = None

    def fail_row(i: int, reason: str, detail: str) -> None:
        """Quarantine worker i's current row, hand the rest of its task to a fresh worker."""
        w = pool[i]
        task = w.task
        assert task is not None
        loc = task.records[w.done].location
        settle(w, Outcome(reason=reason, detail=f"{loc}: {detail}"))
        if w.task is not None:
            rest = w.done
            todo.appendleft(_Task(task.batch, task.start + rest, task.records[rest:]))
        w.stop(kill=True)
        pool[i] = _Worker(ctx, args)

    def drain(w: _Worker) -> bool:
        """Handle every message waiting from `w`; True when its pipe is closed (the worker is gone)."""
        try:
            while w.conn.poll():
                kind, payload = w.conn.recv()
                if kind == "ready":
                    w.ready, w.since = True, time.monotonic()
                elif kind == "row":
                    settle(w, payload)
                elif kind == "init_error":
                    raise RuntimeError(f"a validator worker failed to start:\n{payload}")
                else:
                    raise RuntimeError(f"the validator raised on {payload}")
        except (EOFError, OSError):
            return True
        return False

    try:
        while True:
            while not exhausted and len(batches) < 2 * len(pool):
                batch = list(itertools.islice(it, batch_rows))
                if not batch:
                    exhausted = True
                    break
                b = next(ids)
                batches[b], outcomes[b], answered[b] = batch, [None] * len(batch), 0
                todo.append(_Task(b, 0, batch))
            if next_out in batches and answered[next_out] == len(batches[next_out]):
                done = outcomes.pop(next_out)
                answered.pop(next_out)
                yield from zip(batches.pop(next_out), done, strict=True)  # type: ignore[misc]
                next_out += 1
                continue
            if exhausted and not batches:
                return
            for i, w in enumerate(pool):
                if w.ready and w.task is None and todo:
                    task = todo.popleft()
                    try:
                        w.assign(task)
                    except OSError:  # it died idle: the task goes to its replacement
                        todo.appendleft(task)
                        w.stop(kill=True)
                        pool[i] = _Worker(ctx, args)
            now = time.monotonic()
            limits = [w.since + (row_timeout_s if w.ready else startup) for w in pool if w.task or not w.ready]
            timeout = max(0.0, min(limits) - now) if limits else None
            wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], timeout)
            for i, w in enumerate(pool):
                dead = drain(w)
                if not dead and not w.proc.is_alive():
                    drain(w)  # what it sent before it died is still in the pipe: read it before blaming a row
                    dead = True
                if not w.ready:
                    if dead:
                        raise RuntimeError(f"a validator worker exited (code {w.proc.exitcode}) before it started")
                    if time.monotonic() - w.since > startup:
                        raise RuntimeError(f"a validator worker did not start within {startup:.0f} s")
                elif w.task is not None and dead:
                    w.proc.join(timeout=1)  # its exit code comes from the fork server, shortly after
                    fail_row(i, VALIDATOR_CRASHED, f"the validator process died (exit code {w.proc.exitcode})")
                elif w.task is not None and time.monotonic() - w.since > row_timeout_s:
                    fail_row(i, TIMEOUT, f"validation took over row_timeout_s={row_timeout_s:g} s")
                elif dead:  # idle and gone: replace it
                    w.stop(kill=True)
                    pool[i] = _Worker(ctx, args)
    finally:
        for w in pool:
            w.stop(kill=False)
