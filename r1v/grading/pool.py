"""Run a grading function over many items in worker processes, each item under a hard time bound.

SymPy can spend unbounded time inside C-level big-integer arithmetic (``2^{2^{2^{99}}}``) where no signal or
exception reaches it, so a per-item bound has to be enforced from outside: the parent watches each worker's
progress and kills a worker whose current item runs past the bound, records that item with ``on_timeout``,
and starts a fresh worker for the rest.  Workers are forked so they inherit loaded modules (SymPy takes a
second to import) and the grading function needs no pickling; only items and results cross the pipes.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _worker(
    conn: Connection, fn: Callable[[Any], Any], on_error: Callable[[Any, BaseException], Any]
) -> None:
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        conn.send((-1, None))  # started: the parent's clock for this chunk begins now, not at fork time
        for index, task in chunk:
            try:
                result = fn(task)
            except Exception as exc:  # one bad item must not take the batch down
                result = on_error(task, exc)
            conn.send((index, result))


class _Slot:
    def __init__(
        self, ctx: Any, fn: Callable[[Any], Any], on_error: Callable[[Any, BaseException], Any]
    ) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, fn, on_error), daemon=True)
        self.proc.start()
        child.close()
        self.pending: deque[int] = deque()
        self.since = time.monotonic()
        self.started = False  # has the worker acknowledged its current chunk?

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def run_bounded(
    tasks: Sequence[T],
    fn: Callable[[T], R],
    *,
    workers: int,
    timeout: float,
    on_timeout: Callable[[T], R],
    on_error: Callable[[T, BaseException], R],
    chunk_size: int = 16,
) -> list[R]:
    """``[fn(t) for t in tasks]`` in ``workers`` forked processes; an item taking over ``timeout`` seconds
    yields ``on_timeout(t)``, one raising yields ``on_error(t, exc)``.  Results keep the order of ``tasks``.
    """
    n = len(tasks)
    results: list[Any] = [None] * n
    done = [False] * n
    todo: deque[int] = deque(range(n))
    ctx = mp.get_context("fork")
    slots = [_Slot(ctx, fn, on_error) for _ in range(max(1, min(workers, n)))]
    remaining = n
    startup = max(30.0, 10 * timeout)  # a forked worker on a loaded machine may be slow to pick up a chunk
    try:
        while remaining:
            for slot in slots:
                if not slot.pending and todo:
                    size = max(1, min(chunk_size, len(todo) // len(slots) or 1))
                    chunk = [todo.popleft() for _ in range(min(size, len(todo)))]
                    slot.pending.extend(chunk)
                    slot.since, slot.started = time.monotonic(), False
                    slot.conn.send([(i, tasks[i]) for i in chunk])
            busy = [s for s in slots if s.pending]
            deadline = min(s.since + (timeout if s.started else startup) for s in busy)
            ready = wait([s.conn for s in busy], timeout=max(0.0, deadline - time.monotonic()))
            for i, slot in enumerate(slots):
                if not slot.pending:
                    continue
                if slot.conn in ready:
                    try:
                        index, result = slot.conn.recv()
                    except (EOFError, OSError):
                        # the worker died (e.g. out of memory): blame its current item, requeue the rest
                        index = slot.pending[0]
                        result = on_error(tasks[index], RuntimeError("grading worker died"))
                        slot.pending.popleft()
                        todo.extendleft(reversed(slot.pending))
                        slot.pending.clear()
                        slot.kill()
                        slots[i] = _Slot(ctx, fn, on_error)
                    else:
                        slot.since, slot.started = time.monotonic(), True
                        if index < 0:
                            continue
                        slot.pending.remove(index)
                    if not done[index]:
                        results[index], done[index] = result, True
                        remaining -= 1
                elif time.monotonic() - slot.since >= (timeout if slot.started else startup):
                    index = slot.pending.popleft()
                    results[index], done[index] = on_timeout(tasks[index]), True
                    remaining -= 1
                    todo.extendleft(reversed(slot.pending))
                    slot.pending.clear()
                    slot.kill()
                    slots[i] = _Slot(ctx, fn, on_error)
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except OSError:
                pass
            slot.proc.join(timeout=1)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join()
    return results
