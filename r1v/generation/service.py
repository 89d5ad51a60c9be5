"""The generation service: rollout engines for a config's `engine` section, in this process or as a pool of Ray
actors (`r1v.generation.warm_pool`), and batched generation over preprocessed prompts with per-call seeds.

Every stage that generates (eval, generate, distill) and `r1v eval run` go through here. Calls and their seeds do
not depend on where they run, so actors and an in-process engine give the same completions, for any number of
engines.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from tqdm import tqdm

from r1v.core.config import EvalEngineConfig
from r1v.generation import warm_pool
from r1v.generation.engines import ENGINES, Request
from r1v.generation.warm_pool import EnginePool


class EngineSpec(Protocol):
    """What the service reads of a stage's config (`EvalConfig` and the configs that share its engines)."""

    engine: EvalEngineConfig
    torch_threads: int | None


GREEDY: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Generate on `n` threads (default: every CPU this process may use), then restore the caller's setting."""
    prev = torch.get_num_threads()
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(prev)


def engine_class(c: EngineSpec) -> type:
    """The engine class `c.engine.kind` names; a ValueError naming the field when none is registered."""
    try:
        return ENGINES.get(c.engine.kind)
    except KeyError as e:
        raise ValueError(f"engine.kind: {e.args[0]}") from None


def engine_options(c: EngineSpec) -> dict[str, Any]:
    """No log-probs (eval grades text only) and a static KV cache on CPU, where the engine class offers them."""
    params = inspect.signature(engine_class(c)).parameters
    base = {k: v for k, v in (("logprobs", False), ("static_cache", True)) if k in params}
    return {**base, **c.engine.kind_options()}


def engine_threads(c: EngineSpec) -> int:
    """Torch threads of each engine actor: `torch_threads`, else the CPUs the actor reserves (at least 1)."""
    return c.torch_threads or max(1, int(c.engine.num_cpus))


def make_engine(model_dir: str, c: EngineSpec):
    """The rollout engine of `c.engine` in this process, in its dtype, with `engine_options`."""
    cls = engine_class(c)
    extra = engine_options(c)
    if "dtype" in inspect.signature(cls).parameters:
        extra["dtype"] = c.engine.resolved_dtype()
    return cls(model_dir, max_batch=c.engine.max_batch, **extra)


@contextlib.contextmanager
def engine_pool(model_dir: str, c: EngineSpec, actors: bool, keep_warm_s: float = 0.0
                ) -> Iterator[EnginePool | None]:
    """Engine actors for `c` (`r1v.generation.warm_pool`: a warm pool that fits, else new ones, loading while the caller
    prepares its prompts) when `actors`, else None (generate in this process). On a clean exit the actors are kept
    `keep_warm_s` seconds for the next eval stage; on an error they stop at once."""
    engine_class(c)  # an unknown engine fails before anything starts
    if not actors:
        yield None
        return
    e = c.engine
    pool = warm_pool.acquire(model_dir, e.kind, e.num_engines, e.num_cpus, e.num_gpus, e.max_batch,
                               engine_threads(c), e.resolved_dtype(), engine_options(c), e.max_restarts,
                               e.call_timeout_s, e.ready_timeout_s)
    try:
        yield pool
    except BaseException:
        pool.close()
        raise
    warm_pool.release(pool, keep_warm_s)


@contextlib.contextmanager
def open_engine(model_dir: str, c: EngineSpec, actors: bool, keep_warm_s: float = 0.0
                ) -> Iterator[tuple[EnginePool | Any, int]]:
    """(engine, torch threads per engine) for `c`: a pool of engine actors when `actors` (`engine_pool`: warm
    ones when they fit, kept `keep_warm_s` for the next stage), else one engine in this process, generating on
    `c.torch_threads` threads until the block ends. The one way every stage and `r1v eval run` get an engine."""
    with engine_pool(model_dir, c, actors, keep_warm_s) as pool:
        if pool is not None:
            yield pool, engine_threads(c)
            return
        engine = make_engine(model_dir, c)
        with torch_threads(c.torch_threads) as n:
            yield engine, n


Done = Callable[[int, int, list[tuple[int, int, list[Any]]]], None]
"""A progress callback of `generate_jobs`: (sequences done, sequences in all, what the call just finished
returned: (job, prompt index, its completions) for each of its prompts)."""


def generate_jobs(engine, prompts: list[dict[str, Any]], jobs: list[tuple[dict[str, Any], int]], seed: int,
                  batch: int, desc: str = "eval generate", penalty_key: str | None = None,
                  progress: Done | None = None, scope_key: str | None = None) -> list[list[list[Any]]]:
    """For each job (sampling, n): n completions per prompt, `batch` sequences per engine call, in input order.

    Prompts are batched in order of (tiles, length) so that a batch pads little; each call's seed is `seed` +
    its first position in that order (so sampled runs repeat for the same `batch`, on any number of engines;
    greedy ones for any `batch`). `engine` is an in-process engine or an `EnginePool`, which gets the calls of
    every job at once. With `penalty_key`, each prompt's value under that key is its request's repetition
    penalty (AL-CoTD's per-sample penalties); otherwise the sampling's applies to all. `scope_key` likewise
    names each prompt's repetition penalty scope (`prompt_and_generated` or `generated`; None or a missing key:
    the sampling's `repetition_penalty_scope`). `progress` is called as each engine call returns (`Done`), in
    this process.
    """
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i]["n_tiles"], len(prompts[i]["input_ids"])))
    calls: list[tuple[list[Any], dict[str, Any], int, int]] = []
    where: list[tuple[int, list[int]]] = []
    for j, (sampling, n) in enumerate(jobs):
        per_call = max(1, batch // n)
        for start in range(0, len(order), per_call):
            idx = order[start : start + per_call]
            reqs = [Request(prompts[i]["input_ids"], prompts[i]["pixel_values"], prompts[i]["n_tiles"],
                            repetition_penalty=prompts[i][penalty_key] if penalty_key else None,
                            repetition_penalty_scope=prompts[i].get(scope_key) if scope_key else None)
                    for i in idx]
            calls.append((reqs, sampling, n, seed + start))
            where.append((j, idx))
    total = sum(len(reqs) * n for reqs, _, n, _ in calls)
    done = [0]

    def on_done(k: int, groups: list[Any]) -> None:
        done[0] += len(calls[k][0]) * calls[k][2]
        if progress is not None:
            j, idx = where[k]
            progress(done[0], total, [(j, i, g) for i, g in zip(idx, groups, strict=True)])

    if isinstance(engine, EnginePool):
        results = engine.run(calls, desc, on_done)
    else:
        results = []
        for k, call in enumerate(tqdm(calls, desc=desc, unit="batch", mininterval=5)):
            results.append(engine.generate(*call))
            on_done(k, results[-1])
    out: list[list[list[Any]]] = [[[] for _ in prompts] for _ in jobs]
    for (j, idx), groups in zip(where, results, strict=True):
        for i, group in zip(idx, groups, strict=True):
            out[j][i] = group
    return out


def generate(engine, prompts: list[dict[str, Any]], sampling: dict[str, Any], n: int, seed: int, batch: int,
             desc: str = "eval generate", progress: Done | None = None) -> list[list[Any]]:
    """n completions per prompt, `batch` sequences per engine call, in input order (see `generate_jobs`)."""
    return generate_jobs(engine, prompts, [(sampling, n)], seed, batch, desc, progress=progress)[0]
