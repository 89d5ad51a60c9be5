"""The eval's engines as Ray actors: a pool that spreads chunks of requests over them, kept warm between
consecutive eval stages.

Starting an engine actor costs seconds (a new process imports torch and transformers before it loads the model);
loading another model into a running one costs what loading costs. So a pool the stage no longer needs may be
kept for `keep_warm_s` seconds: an eval stage that starts within that time and asks for the same actors (kind,
count, CPUs, GPUs, threads) reloads them with its model instead of starting new ones; otherwise a timer stops
them. The workflow's eval stages come one after another (tiny.yaml: seven at the end), so only the first pays.
Before a stage of another kind the workflow stops a pool that holds CPUs or GPUs; one that holds neither (CPU
engines with num_cpus 0) is kept through it, up to KEEP_FREE_WARM_S (tiny.yaml's iterative SFT rounds).
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import torch

from r1v.generation.engines import ENGINES, EngineHost, start_engines

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
        return True


class EnginePool:
    """Engine actors (`EvalEngineHost`) behind one `run(calls)`.

    Each call (a chunk of requests with its own seed) goes to the actor with the fewest calls in flight, at most
    `IN_FLIGHT` each, and results come back in call order: which actor ran a chunk, and how many actors there
    are, never shows in the completions.
    """

    IN_FLIGHT = 2

    def __init__(self, key: tuple[Any, ...], handles: list[Any]) -> None:
        self.key = key
        self.handles = handles
        self._loading: list[Any] = []

    @property
    def reserves_nothing(self) -> bool:
        """Whether the actors hold no CPUs and no GPUs (the key's num_cpus and num_gpus)."""
        return self.key[3] == 0 and self.key[4] == 0

    @classmethod
    def start(cls, key: tuple[Any, ...], model_dir: str, kind: str, num: int, num_cpus: float, num_gpus: float,
              max_batch: int, torch_threads: int, dtype: str, options: dict[str, Any]) -> EnginePool:
        """Create the actors without waiting: they load the model while the caller prepares its prompts."""
        return cls(key, start_engines(kind, model_dir, num, num_cpus, num_gpus, max_batch, torch_threads=torch_threads,
                                      dtype=dtype, options=options, wait=False, host=EvalEngineHost))

    def load(self, kind: str, model_dir: str, max_batch: int, dtype: str, options: dict[str, Any]) -> None:
        """Swap every actor's model (without waiting; `run` waits)."""
        self._loading = [h.load.remote(kind, model_dir, max_batch, dtype, options) for h in self.handles]

    def run(self, calls: list[tuple[Any, ...]], desc: str) -> list[Any]:
        """`engine.generate(*call)` for each call, spread over the actors; results in call order."""
        import ray
        from tqdm import tqdm

        ray.get(self._loading)  # a model that failed to load fails here, not as a missing engine
        self._loading = []
        results: list[Any] = [None] * len(calls)
        load = [0] * len(self.handles)
        pending: dict[Any, tuple[int, int]] = {}
        nxt = 0
        with tqdm(total=len(calls), desc=desc, unit="batch", mininterval=5) as bar:
            while nxt < len(calls) or pending:
                while nxt < len(calls) and min(load) < self.IN_FLIGHT:
                    e = load.index(min(load))
                    pending[self.handles[e].generate.remote(*calls[nxt])] = (nxt, e)
                    load[e] += 1
                    nxt += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    k, e = pending.pop(ref)
                    load[e] -= 1
                    results[k] = ray.get(ref)
                    bar.update()
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
            torch_threads: int, dtype: str, options: dict[str, Any]) -> EnginePool:
    """A pool of `num` actors with `model_dir` loaded (or loading): the warm one when it fits, else new actors."""
    import ray

    global _warm
    key = (ray.get_runtime_context().get_job_id(), kind, num, num_cpus, num_gpus, torch_threads)
    with _lock:
        warm, _warm = _warm, None
    if warm is not None:
        pool, timer = warm
        timer.cancel()
        if pool.key == key:
            pool.load(kind, model_dir, max_batch, dtype, options)
            return pool
        pool.close()
    return EnginePool.start(key, model_dir, kind, num, num_cpus, num_gpus, max_batch, torch_threads, dtype, options)


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
