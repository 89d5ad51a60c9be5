"""The `eval` stage on an r1v corpus with answers: one greedy generation per item gives `accuracy`, K sampled ones
give pass@1 (their mean); both are reported, with standard errors, so that rows of the results table compare.

Modes make the baselines the same code path as the model under test: `vlm` (the corpus as is), `no_image`
(every tile blanked: what the model scores without looking) and `text` (a causal LM asked each row's
`meta.text_question`: the numbers written out, no image). Benchmarks (MMMU, MathVista, ...) go through
`r1v.eval.runner`, which shares `generate_samples`.

Where the model runs: in the workflow (Ray up) the engines are Ray actors (`EvalEngineConfig`: how many, their
CPUs, GPUs and dtype) and this process only reads, sends chunks of requests, gathers and grades; without Ray
(`r1v eval run`, direct calls) one engine runs in this process. Chunks and their seeds do not depend on where
they run, so both give the same predictions, for any number of engines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1v.core.config import PreprocessConfig
from r1v.core.fs import atomic_write_json, atomic_write_text
from r1v.eval.config import EvalConfig

if TYPE_CHECKING:
    from r1v.generation.warm_pool import EnginePool

GREEDY: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}


# --------------------------------------------------------------------------- prompts


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(row.get("meta") or "{}")
    except (TypeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def text_prompts(rows: list[dict[str, Any]], model_dir: str, pre: PreprocessConfig
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Prompts from `meta.text_question` as one user turn without images (the prompt builder of every other
    prompt, so the assistant turn opens with `<think>\\n`); rows without one are quarantined, never dropped."""
    from r1v.data.pipeline import load_tokenizer
    from r1v.data.prompt import encode_prompt

    tok = load_tokenizer(model_dir)
    good, bad = [], []
    for row in rows:
        q = _meta(row).get("text_question")
        reason, detail = "", ""
        if not isinstance(q, str) or not q.strip():
            reason, detail = "no_text_question", "meta has no text_question"
        else:
            try:
                ids = encode_prompt([{"role": "user", "content": q}], tok, [], 1, system=pre.system_prompt)
                if len(ids) > pre.max_length:
                    reason, detail = "too_long", f"prompt has {len(ids)} tokens, max_length is {pre.max_length}"
            except ValueError as e:
                reason, detail = "image_markers", str(e)
        if reason:
            bad.append({"id": row["id"], "reason": reason, "detail": detail[:500], "source": row.get("source") or ""})
        else:
            good.append({**row, "input_ids": ids, "labels": [], "n_tiles": 0, "pixel_values": b""})
    return good, bad


def blank_tiles(prompts: list[dict[str, Any]]) -> None:
    """Replace every prompt's tiles by uint8 zeros of the same count: the projector then carries no image."""
    for p in prompts:
        p["pixel_values"] = bytes(len(p["pixel_values"]))


def load_items(c: EvalConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(prompts, quarantine records, rows read) for `c.corpus` in `c.mode`; each prompt carries its `level`."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from r1v.data.pipeline import prepare_prompts

    names = set(pads.dataset(c.corpus, format="parquet").schema.names)  # corpora written before `meta` lack it
    cols = [k for k in ("id", "images", "messages", "answer", "source", "meta") if k in names]
    rows = pq.read_table(c.corpus, columns=cols).to_pylist()
    rows = rows[: c.limit] if c.limit else rows
    if c.mode == "text":
        prompts, bad = text_prompts(rows, c.model, c.preprocess)
    else:
        from r1v.generation.engines import is_vlm_dir

        if not is_vlm_dir(c.model):
            raise ValueError(f"eval mode {c.mode!r} needs a VLM, and {c.model} holds a causal LM: use mode 'text'")
        prompts, bad = prepare_prompts(rows, c.model, c.preprocess)
        if c.mode == "no_image":
            blank_tiles(prompts)
    for p in prompts:
        level = _meta(p).get("level")
        p["level"] = level if isinstance(level, int) and not isinstance(level, bool) else None
    return prompts, bad, len(rows)


# --------------------------------------------------------------------------- generation


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


def engine_class(c: EvalConfig) -> type:
    """The engine class `c.engine.kind` names; a ValueError naming the field when none is registered."""
    from r1v.generation.engines import ENGINES

    try:
        return ENGINES.get(c.engine.kind)
    except KeyError as e:
        raise ValueError(f"engine.kind: {e.args[0]}") from None


def engine_options(c: EvalConfig) -> dict[str, Any]:
    """No log-probs (eval grades text only) and a static KV cache on CPU, where the engine class offers them."""
    import inspect

    params = inspect.signature(engine_class(c)).parameters
    base = {k: v for k, v in (("logprobs", False), ("static_cache", True)) if k in params}
    return {**base, **c.engine.kind_options()}


def engine_threads(c: EvalConfig) -> int:
    """Torch threads of each engine actor: `torch_threads`, else the CPUs the actor reserves (at least 1)."""
    return c.torch_threads or max(1, int(c.engine.num_cpus))


def make_engine(model_dir: str, c: EvalConfig):
    """The rollout engine of `c.engine` in this process, in its dtype, with `engine_options`."""
    import inspect

    cls = engine_class(c)
    extra = engine_options(c)
    if "dtype" in inspect.signature(cls).parameters:
        extra["dtype"] = c.engine.resolved_dtype()
    return cls(model_dir, max_batch=c.engine.max_batch, **extra)


@contextlib.contextmanager
def engine_pool(model_dir: str, c: EvalConfig, actors: bool, keep_warm_s: float = 0.0
                ) -> Iterator[EnginePool | None]:
    """Engine actors for `c` (`r1v.generation.warm_pool`: a warm pool that fits, else new ones, loading while the caller
    prepares its prompts) when `actors`, else None (generate in this process). On a clean exit the actors are kept
    `keep_warm_s` seconds for the next eval stage; on an error they stop at once."""
    engine_class(c)  # an unknown engine fails before anything starts
    if not actors:
        yield None
        return
    from r1v.generation import warm_pool as eval_actors

    e = c.engine
    pool = eval_actors.acquire(model_dir, e.kind, e.num_engines, e.num_cpus, e.num_gpus, e.max_batch,
                               engine_threads(c), e.resolved_dtype(), engine_options(c))
    try:
        yield pool
    except BaseException:
        pool.close()
        raise
    eval_actors.release(pool, keep_warm_s)


def generate_jobs(engine, prompts: list[dict[str, Any]], jobs: list[tuple[dict[str, Any], int]], seed: int,
                  batch: int, desc: str = "eval generate", penalty_key: str | None = None
                  ) -> list[list[list[Any]]]:
    """For each job (sampling, n): n completions per prompt, `batch` sequences per engine call, in input order.

    Prompts are batched in order of (tiles, length) so that a batch pads little; each call's seed is `seed` +
    its first position in that order (so sampled runs repeat for the same `batch`, on any number of engines;
    greedy ones for any `batch`). `engine` is an in-process engine or an `EnginePool`, which gets the calls of
    every job at once. With `penalty_key`, each prompt's value under that key is its request's repetition
    penalty (AL-CoTD's per-sample penalties); otherwise the sampling's applies to all.
    """
    from tqdm import tqdm

    from r1v.generation.engines import Request
    from r1v.generation.warm_pool import EnginePool

    order = sorted(range(len(prompts)), key=lambda i: (prompts[i]["n_tiles"], len(prompts[i]["input_ids"])))
    calls: list[tuple[list[Any], dict[str, Any], int, int]] = []
    where: list[tuple[int, list[int]]] = []
    for j, (sampling, n) in enumerate(jobs):
        per_call = max(1, batch // n)
        for start in range(0, len(order), per_call):
            idx = order[start : start + per_call]
            reqs = [Request(prompts[i]["input_ids"], prompts[i]["pixel_values"], prompts[i]["n_tiles"],
                            repetition_penalty=prompts[i][penalty_key] if penalty_key else None) for i in idx]
            calls.append((reqs, sampling, n, seed + start))
            where.append((j, idx))
    if isinstance(engine, EnginePool):
        results = engine.run(calls, desc)
    else:
        results = [engine.generate(*call) for call in tqdm(calls, desc=desc, unit="batch", mininterval=5)]
    out: list[list[list[Any]]] = [[[] for _ in prompts] for _ in jobs]
    for (j, idx), groups in zip(where, results, strict=True):
        for i, group in zip(idx, groups, strict=True):
            out[j][i] = group
    return out


def generate(engine, prompts: list[dict[str, Any]], sampling: dict[str, Any], n: int, seed: int, batch: int,
             desc: str = "eval generate") -> list[list[Any]]:
    """n completions per prompt, `batch` sequences per engine call, in input order (see `generate_jobs`)."""
    return generate_jobs(engine, prompts, [(sampling, n)], seed, batch, desc)[0]


def generate_samples(model_dir: str, prompts: list[dict[str, Any]], c: EvalConfig, engine=None) -> list[list[Any]]:
    """K sampled completions per preprocessed prompt, from `engine` (an `EnginePool` or an in-process engine;
    default: one built in this process)."""
    engine = engine or make_engine(model_dir, c)
    with torch_threads(c.torch_threads):
        return generate(engine, prompts, c.sampling.model_dump(), c.samples, c.seed, c.engine.max_batch)


# --------------------------------------------------------------------------- scoring


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def summarize(prompts: list[dict[str, Any]], greedy: list[float] | None, sampled: list[list[float]],
              greedy_tokens: list[int], sampled_tokens: list[int], c: EvalConfig) -> dict[str, Any]:
    """Accuracy (greedy), pass@1 (mean over K samples) with standard errors over items, and per-level scores.

    stderr = sqrt(p(1-p)/n) for the greedy accuracy; pass_at_1_stderr = std over items of the per-item mean
    correctness / sqrt(n). pass_at_1_std (the spread across the K sample runs) is kept for older readers.
    """
    from r1v.eval.passk import pass_at_1

    n = len(prompts)
    per_item = [sum(s) / len(s) for s in sampled]
    p1 = sum(per_item) / n if n else 0.0
    item_sd = math.sqrt(sum((x - p1) ** 2 for x in per_item) / (n - 1)) if n > 1 else 0.0
    runs = [[bool(r[j]) for r in sampled] for j in range(c.samples)]
    _, run_std = pass_at_1(runs) if n else (0.0, 0.0)
    acc = None if greedy is None else sum(greedy) / n if n else 0.0
    mean_sampled = sum(sampled_tokens) / len(sampled_tokens) if sampled_tokens else 0.0
    by_level: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if p.get("level") is not None:
            by_level[p["level"]].append(i)
    levels = {str(lv): {"n": len(ix), "accuracy": sum(greedy[i] for i in ix) / len(ix) if greedy is not None else None,
                        "pass_at_1": sum(per_item[i] for i in ix) / len(ix)} for lv, ix in sorted(by_level.items())}
    return {
        "mode": c.mode, "n": n, "items": n, "samples": c.samples,
        "accuracy": acc, "stderr": binomial_stderr(acc, n) if acc is not None else None,
        "pass_at_1": p1, "pass_at_1_stderr": item_sd / math.sqrt(n) if n else 0.0, "pass_at_1_std": run_std,
        "accuracy_first_sample": sum(r[0] for r in sampled) / n if n else 0.0,
        "mean_response_tokens": (sum(greedy_tokens) / len(greedy_tokens) if greedy_tokens else mean_sampled),
        "mean_response_tokens_sampled": mean_sampled,
        "accuracy_by_level": levels,
    }


def run_eval(c: EvalConfig, stage_dir: Path, log, actors: bool = False, keep_warm_s: float = 0.0) -> dict[str, Any]:
    """Generate (greedy and sampled), grade, write predictions.jsonl and summary.json, log to MLflow.

    With `actors` the engines are Ray actors (`c.engine`) that load the model while the corpus is read, kept
    `keep_warm_s` seconds afterwards for the next eval (`engine_pool`); else one engine runs in this process."""
    from r1v.grading.rewards import REWARDS

    if c.corpus is None:
        from r1v.eval.runner import run_benchmark

        return run_benchmark(c, stage_dir, log, actors=actors, keep_warm_s=keep_warm_s)
    stage_dir = Path(stage_dir)
    grade = REWARDS.get(c.grader)
    with engine_pool(c.model, c, actors, keep_warm_s) as pool:
        t0 = time.monotonic()
        prompts, bad, n_rows = load_items(c)
        t1 = time.monotonic()
        engine = pool or make_engine(c.model, c)
        jobs = [({**c.sampling.model_dump(), **GREEDY}, 1)] if c.greedy and prompts else []
        jobs.append((c.sampling.model_dump(), c.samples))
        threads_ctx = contextlib.nullcontext(engine_threads(c)) if pool else torch_threads(c.torch_threads)
        with threads_ctx as threads:
            *first, sampled = generate_jobs(engine, prompts, jobs, c.seed, c.engine.max_batch)
        greedy = first[0] if first else None
        t2 = time.monotonic()
    preds: list[dict[str, Any]] = []
    g_scores: list[float] | None = [] if greedy is not None else None
    s_scores: list[list[float]] = []
    for i, p in enumerate(prompts):
        base = {"id": p["id"], "answer": p["answer"], "level": p["level"]}
        if greedy is not None:
            cp = greedy[i][0]
            g_scores.append(grade(cp.text, p))
            preds.append({**base, "sample": -1, "greedy": True, "response": cp.text, "n_tokens": len(cp.token_ids),
                          "correct": g_scores[-1]})
        s_scores.append([grade(cp.text, p) for cp in sampled[i]])
        preds += [{**base, "sample": j, "greedy": False, "response": cp.text, "n_tokens": len(cp.token_ids),
                   "correct": s} for j, (cp, s) in enumerate(zip(sampled[i], s_scores[-1], strict=True))]
    t3 = time.monotonic()
    summary = summarize(prompts, g_scores, s_scores, [len(g[0].token_ids) for g in greedy or []],
                        [len(cp.token_ids) for g in sampled for cp in g], c)
    reasons: dict[str, int] = defaultdict(int)
    for b in bad:
        reasons[b["reason"]] += 1
    summary.update(rows=n_rows, quarantined=len(bad), quarantine_reasons=dict(reasons), greedy=c.greedy,
                   report_stage=c.report_stage, report_baseline=c.report_baseline, torch_threads=threads,
                   seconds={"prepare": t1 - t0, "generate": t2 - t1, "grade": t3 - t2},
                   generated_sequences=len(prompts) * (c.samples + (1 if greedy is not None else 0)))
    pred_path = stage_dir / "predictions.jsonl"
    atomic_write_text(pred_path, "".join(json.dumps(p) + "\n" for p in preds))
    if bad:
        atomic_write_text(stage_dir / "quarantine.jsonl", "".join(json.dumps(b) + "\n" for b in bad))
    atomic_write_json(stage_dir / "summary.json", summary)
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({f"accuracy_level_{lv}": v["accuracy"] for lv, v in summary["accuracy_by_level"].items()})
    metrics.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
    log.metrics(metrics, 0)
    log.artifact(pred_path)
    log.dict(summary, "summary.json")
    print(f"[eval] {c.mode} {c.model}: accuracy {summary['accuracy']}, pass@1 {summary['pass_at_1']:.3f} over "
          f"{summary['n']} items ({len(bad)} quarantined), {t2 - t1:.1f} s generating")
    return {"predictions": pred_path, "summary": stage_dir / "summary.json", **summary}
