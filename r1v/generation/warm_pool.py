"""The eval's engines as Ray actors: a pool that spreads chunks of requests over them, kept warm between
consecutive eval stages.

Starting an engine actor costs seconds (a new process imports torch and transformers before it loads the model);
loading another model into a running one costs what loading costs. So a pool the stage no longer needs may be
kept for `keep_warm_s` seconds: an eval stage that starts within that time and asks for the same actors (kind,
count, CPUs, GPUs, threads) reloads them with its model instead of starting new ones; otherwise a timer stops
them. The workflow's eval stages come one after another (tiny.yaml: seven at the end), so only the first pays.
Before a stage of another kind the workflow stops a pool that holds CPUs or GPUs; one that holds neither (CPU
engines with num_cpus 0) is kept through it, up to KEEP_FREE_WARM_S (tiny.yaml's iterative SFT rounds).

Every wait on an actor has a deadline (`engine.ready_timeout_s` for starting and loading, `engine.call_timeout_s`
for a chunk); an actor that dies is restarted by Ray (`engine.max_restarts`), given the stage's model again and
sent the chunks it lost, which carry their own seeds: the predictions are those of a run without the loss.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from r1v.generation.engines import (
    ENGINES,
    EngineGoneError,
    EngineHost,
    EngineHungError,
    EngineLostError,
    Engines,
    start_engines,
)

# How long the workflow's eval stage keeps its actors for the next eval stage: more than the few seconds of
# bookkeeping between two stages; a later stage of another kind waits at most this long for their resources.
KEEP_WARM_S = 20.0
# Before a stage of a kind that does not use the pool (`warm_pool` in the stage-kind catalogue) the workflow stops
# a pool that reserves CPUs or GPUs (`stop_idle`): a training stage would otherwise wait up to KEEP_WARM_S for the
# resources its idle actors hold.
# A pool that reserves nothing (engine.num_cpus 0, no GPUs: idle, it costs only its memory) is kept through the
# stages of other kinds, up to this long, for the next eval (iterative SFT: round t's SFT between its generate and
# its eval): an engine actor's start (a process importing torch and transformers) costs seconds each time.
KEEP_FREE_WARM_S = 300.0


class EvalEngineHost(EngineHost):
    """An engine actor that can swap its model for another (between eval stages)."""

    def load(self, kind: str, model_dir: str, max_batch: int, dtype: str, options: dict[str, Any]) -> bool:
        self.engine = None  # free the old model before the new one is loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.engine = ENGINES.get(kind)(model_dir, max_batch=max_batch, dtype=dtype, **options)
        self.version = None  # a checkpoint's weights again
        return True


class EnginePool:
    """Engine actors (`EvalEngineHost`) behind one `run(calls)`.

    Each call (a chunk of requests with its own seed) goes to the actor with the fewest calls in flight, at most
    `IN_FLIGHT` each, and results come back in call order: which actor ran a chunk, and how many actors there
    are, never shows in the completions.
    """

    IN_FLIGHT = 2

    def __init__(self, key: tuple[Any, ...], handles: list[Any], max_restarts: int = 0,
                 call_timeout_s: float = 1200.0, ready_timeout_s: float = 3600.0) -> None:
        self.key = key
        self.handles = handles
        self.max_restarts = max_restarts  # the actors' own (fixed when they start; key[6])
        self.engines = Engines(handles, call_timeout_s, ready_timeout_s)
        self._loading: list[Any] = []
        self._model: tuple[Any, ...] | None = None  # the last `load`'s arguments: what a restarted actor gets again
        self._pids: list[int | None] = [None] * len(handles)  # each actor's process when it got the current model

    @property
    def reserves_nothing(self) -> bool:
        """Whether the actors hold no CPUs and no GPUs (the key's num_cpus and num_gpus)."""
        return self.key[3] == 0 and self.key[4] == 0

    @classmethod
    def start(cls, key: tuple[Any, ...], model_dir: str, kind: str, num: int, num_cpus: float, num_gpus: float,
              max_batch: int, torch_threads: int, dtype: str, options: dict[str, Any], max_restarts: int = 0,
              call_timeout_s: float = 1200.0, ready_timeout_s: float = 3600.0) -> EnginePool:
        """Create the actors without waiting: they load the model while the caller prepares its prompts."""
        return cls(key, start_engines(kind, model_dir, num, num_cpus, num_gpus, max_batch, torch_threads=torch_threads,
                                      dtype=dtype, options=options, wait=False, host=EvalEngineHost,
                                      max_restarts=max_restarts), max_restarts, call_timeout_s, ready_timeout_s)

    def load(self, kind: str, model_dir: str, max_batch: int, dtype: str, options: dict[str, Any]) -> None:
        """Swap every actor's model (without waiting; `run` waits)."""
        self._model = (kind, model_dir, max_batch, dtype, options)
        self._loading = [h.load.remote(*self._model) for h in self.handles]

    def _ready(self) -> None:
        """Wait for the actors' start and model load (a model that fails to load fails here, by engine)."""
        every = list(range(len(self.handles)))
        if self._loading:
            self.engines.get(every, self._loading, "load (the stage's model)", self.engines.ready_timeout_s,
                             "engine.ready_timeout_s")
            self._loading = []
        self._pids = [w["pid"] for w in self.engines.ready()]

    def _revive(self, e: int) -> None:
        """After a lost call on actor `e`: wait until Ray has restarted it and give it the stage's model again
        (a restarted actor loads the model it was created with)."""
        (w,) = self.engines.ready([e])
        if w["pid"] != self._pids[e] and self._model is not None:
            self.engines.get([e], [self.handles[e].load.remote(*self._model)], "load (after a restart)",
                             self.engines.ready_timeout_s, "engine.ready_timeout_s")
        self._pids[e] = w["pid"]

    def run(self, calls: list[tuple[Any, ...]], desc: str,
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """`engine.generate(*call)` for each call, spread over the actors; results in call order. An actor with
        calls in flight that answers none within `call_timeout_s` fails the run naming it. `on_done(k, result)` is
        called as call k's result arrives (in this process: progress)."""
        import ray
        from tqdm import tqdm

        self._ready()
        results: list[Any] = [None] * len(calls)
        load = [0] * len(self.handles)
        since = [0.0] * len(self.handles)  # when each busy actor last started or finished a call
        pending: dict[Any, tuple[int, int]] = {}
        todo = deque(range(len(calls)))
        lost = 0
        timeout = self.engines.call_timeout_s
        with tqdm(total=len(calls), desc=desc, unit="batch", mininterval=5) as bar:
            while todo or pending:
                while todo and min(load) < self.IN_FLIGHT:
                    e = load.index(min(load))
                    k = todo.popleft()
                    pending[self.handles[e].generate.remote(*calls[k])] = (k, e)
                    if load[e] == 0:
                        since[e] = time.monotonic()
                    load[e] += 1
                busy = [e for e in range(len(load)) if load[e]]
                wait_s = max(0.0, min(since[e] for e in busy) + timeout - time.monotonic())
                done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
                if not done:
                    hung = [e for e in busy if time.monotonic() - since[e] >= timeout]
                    if hung:
                        raise EngineHungError(f"{', '.join(self.engines.name(e) for e in hung)}: generate did not "
                                              f"return within {timeout:g} s (engine.call_timeout_s); the engine is "
                                              "hung or far slower than expected")
                    continue
                for ref in done:
                    k, e = pending.pop(ref)
                    load[e] -= 1
                    since[e] = time.monotonic()
                    try:
                        (results[k],) = self.engines.get([e], [ref], "generate", 0.0)
                    except EngineLostError as err:
                        lost += 1
                        if lost > self.max_restarts * len(self.handles) * self.IN_FLIGHT:
                            raise EngineGoneError(f"{err}; {lost} calls lost in this run (engine.max_restarts "
                                                  f"{self.max_restarts})") from err
                        self._revive(e)
                        todo.appendleft(k)  # chunks carry their own seeds: any actor gives the same result
                        continue
                    bar.update()
                    if on_done is not None:
                        on_done(k, results[k])
        return results

    def close(self) -> None:
        import ray

        if not ray.is_initialized():  # the cluster is gone, and the actors with it
            return
        for h in self.handles:
            ray.kill(h)


# --------------------------------------------------------------------------- the warm pool

_lock = threading.Lock()
_warm: tuple[EnginePool, threading.Timer] | None = None


def acquire(model_dir: str, kind: str, num: int, num_cpus: float, num_gpus: float, max_batch: int,
            torch_threads: int, dtype: str, options: dict[str, Any], max_restarts: int = 0,
            call_timeout_s: float = 1200.0, ready_timeout_s: float = 3600.0) -> EnginePool:
    """A pool of `num` actors with `model_dir` loaded (or loading): the warm one when it fits, else new actors."""
    import ray

    global _warm
    key = (ray.get_runtime_context().get_job_id(), kind, num, num_cpus, num_gpus, torch_threads, max_restarts)
    with _lock:
        warm, _warm = _warm, None
    if warm is not None:
        pool, timer = warm
        timer.cancel()
        if pool.key == key:
            pool.engines.call_timeout_s, pool.engines.ready_timeout_s = call_timeout_s, ready_timeout_s
            pool.load(kind, model_dir, max_batch, dtype, options)
            return pool
        pool.close()
    return EnginePool.start(key, model_dir, kind, num, num_cpus, num_gpus, max_batch, torch_threads, dtype, options,
                            max_restarts, call_timeout_s, ready_timeout_s)


def release(pool: EnginePool, keep_warm_s: float) -> None:
    """Stop `pool`'s actors now (`keep_warm_s` <= 0), or after `keep_warm_s` seconds (at least KEEP_FREE_WARM_S for a
    pool that reserves nothing) unless `acquire` takes them over first."""
    global _warm
    if keep_warm_s <= 0:
        pool.close()
        return
    if pool.reserves_nothing:
        keep_warm_s = max(keep_warm_s, KEEP_FREE_WARM_S)
    timer = threading.Timer(keep_warm_s, _expire, args=(pool,))
    timer.daemon = True
    with _lock:
        old, _warm = _warm, (pool, timer)
    if old is not None:
        old[1].cancel()
        old[0].close()
    timer.start()


def _expire(pool: EnginePool) -> None:
    global _warm
    with _lock:
        if _warm is None or _warm[0] is not pool:
            return  # taken over meanwhile
        _warm = None
    try:
        pool.close()
    except Exception:  # noqa: BLE001  (a timer thread: the cluster may have been shut down meanwhile)
        pass


def stop_idle() -> bool:
    """Stop the warm pool now unless it holds no resources (a following stage cannot use it); whether one was
    stopped."""
    warm = _warm
    if warm is None or warm[0].reserves_nothing:
        return False
    stop_warm()
    return True


def stop_warm() -> None:
    """Stop the warm pool now, if any."""
    global _warm
    with _lock:
        warm, _warm = _warm, None
    if warm is not None:
        warm[1].cancel()
        warm[0].close()
