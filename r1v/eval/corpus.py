"""The `eval` stage on an r1v corpus with answers: one greedy generation per item gives `accuracy`, K sampled ones
give pass@1 (their mean); both are reported, with standard errors, so that rows of the results table compare.

Modes make the baselines the same code path as the model under test: `vlm` (the corpus as is), `no_image`
(every tile blanked: what the model scores without looking), `shuffled_image` (each item shown another item's
image: an in-distribution image that does not answer the question) and `text` (a causal LM asked each row's
`meta.text_question`: the numbers written out, no image). Benchmarks (MMMU, MathVista, ...) go through
`r1v.eval.runner`; both generate through `r1v.generation.service`.

Where the model runs: in the workflow (Ray up) the engines are Ray actors (`EvalEngineConfig`: how many, their
CPUs, GPUs and dtype) and this process only reads, sends chunks of requests, gathers and grades; without Ray
(`r1v eval run`, direct calls) one engine runs in this process. Chunks and their seeds do not depend on where
they run, so both give the same predictions, for any number of engines.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1v.core.config import PreprocessConfig
from r1v.core.fs import atomic_write_json, atomic_write_text
from r1v.data.schema import question
from r1v.eval.config import EvalConfig
from r1v.eval.passk import pass_at_1
from r1v.generation.engines import is_vlm_dir
from r1v.generation.service import GREEDY, generate_jobs, open_engine
from r1v.grading.rewards import REWARDS

if TYPE_CHECKING:
    pass



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
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
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


def shuffle_images(prompts: list[dict[str, Any]], seed: int) -> int:
    """Give every prompt another prompt's image: within each group of prompts with the same tile count (their
    image tokens must still match), a cyclic shift over a seeded random order, so no prompt keeps its own. A prompt
    alone with its tile count has no image to swap with and is blanked instead (`blank_tiles`). Returns how many
    were blanked."""
    import random

    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p["n_tiles"]].append(i)
    rng = random.Random(seed)
    images = [p["pixel_values"] for p in prompts]
    blanked = 0
    for idx in groups.values():
        if len(idx) == 1:
            blank_tiles([prompts[idx[0]]])
            blanked += 1
            continue
        order = rng.sample(idx, len(idx))
        for k, i in enumerate(order):
            prompts[i]["pixel_values"] = images[order[(k + 1) % len(order)]]
    return blanked


def load_corpus_items(c: EvalConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(prompts, quarantine records, rows read) for `c.corpus` in `c.mode`; each prompt carries its `level`."""
    # imported on use, to keep pyarrow out of light paths
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
        if not is_vlm_dir(c.model):
            raise ValueError(f"eval mode {c.mode!r} needs a VLM, and {c.model} holds a causal LM: use mode 'text'")
        prompts, bad = prepare_prompts(rows, c.model, c.preprocess)
        if c.mode == "no_image":
            blank_tiles(prompts)
        elif c.mode == "shuffled_image":
            shuffle_images(prompts, c.seed)
    for p in prompts:
        level = _meta(p).get("level")
        p["level"] = level if isinstance(level, int) and not isinstance(level, bool) else None
    return prompts, bad, len(rows)


# --------------------------------------------------------------------------- scoring


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def summarize_eval(prompts: list[dict[str, Any]], greedy: list[float] | None, sampled: list[list[float]],
              greedy_tokens: list[int], sampled_tokens: list[int], c: EvalConfig) -> dict[str, Any]:
    """Accuracy (greedy), pass@1 (mean over K samples) with standard errors over items, and per-level scores.

    stderr = sqrt(p(1-p)/n) for the greedy accuracy; pass_at_1_stderr = std over items of the per-item mean
    correctness / sqrt(n). pass_at_1_std (the spread across the K sample runs) is kept for older readers.
    """
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


SAMPLE_TABLE_ROWS = 50
"""Items shown in the MLflow sample table of an eval (their primary generation, with the prompt's image)."""


def run_eval(c: EvalConfig, stage_dir: Path, log, actors: bool = False, keep_warm_s: float = 0.0,
             progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Generate (greedy and sampled), grade, write predictions.jsonl and summary.json, log to MLflow.

    With `actors` the engines are Ray actors (`c.engine`) that load the model while the corpus is read, kept
    `keep_warm_s` seconds afterwards for the next eval (`open_engine`); else one engine runs in this process.
    `progress(step, total, unit=..., **metrics)` (a stage's `ctx.progress`) hears of every finished engine call:
    sequences generated, and the accuracy so far of the primary generations (greedy, else the first sample)."""
    if c.corpus is None:
        from r1v.eval.runner import run_benchmark  # benchmarks load their own data (and SymPy graders)

        return run_benchmark(c, stage_dir, log, actors=actors, keep_warm_s=keep_warm_s, progress=progress)
    stage_dir = Path(stage_dir)
    grade = REWARDS.get(c.grader)
    with open_engine(c.model, c, actors, keep_warm_s) as (engine, threads):  # actors load while the corpus is read
        t0 = time.monotonic()
        prompts, bad, n_rows = load_corpus_items(c)
        t1 = time.monotonic()
        jobs = [({**c.sampling.model_dump(), **GREEDY}, 1)] if c.greedy and prompts else []
        jobs.append((c.sampling.model_dump(), c.samples))
        early: dict[int, float] = {}  # the primary generation's grade, by prompt, as calls return

        def on_calls(done: int, total: int, finished: list[tuple[int, int, list[Any]]]) -> None:
            for j, i, group in finished:
                if j == 0 and group:
                    early[i] = grade(group[0].text, prompts[i])
            progress(done, total, unit="sequence", accuracy=sum(early.values()) / len(early) if early else None)

        *first, sampled = generate_jobs(engine, prompts, jobs, c.seed, c.engine.max_batch,
                                        progress=on_calls if progress is not None else None)
        greedy = first[0] if first else None
        t2 = time.monotonic()
    preds: list[dict[str, Any]] = []
    g_scores: list[float] | None = [] if greedy is not None else None
    s_scores: list[list[float]] = []
    for i, p in enumerate(prompts):
        base = {"id": p["id"], "answer": p["answer"], "level": p["level"]}
        if greedy is not None:
            cp = greedy[i][0]
            g_scores.append(early[i] if i in early else grade(cp.text, p))
            preds.append({**base, "sample": -1, "greedy": True, "response": cp.text, "n_tokens": len(cp.token_ids),
                          "correct": g_scores[-1]})
        s_scores.append([grade(cp.text, p) for cp in sampled[i]])
        preds += [{**base, "sample": j, "greedy": False, "response": cp.text, "n_tokens": len(cp.token_ids),
                   "correct": s} for j, (cp, s) in enumerate(zip(sampled[i], s_scores[-1], strict=True))]
    t3 = time.monotonic()
    summary = summarize_eval(prompts, g_scores, s_scores, [len(g[0].token_ids) for g in greedy or []],
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
    primary = [x for x in preds if x["sample"] == (-1 if greedy is not None else 0)][:SAMPLE_TABLE_ROWS]
    # a row's own image only where the model saw it (not in the no_image, shuffled_image and text modes)
    log.table([{**x, "question": question(p), "images": p.get("images") if c.mode == "vlm" else None}
               for x, p in zip(primary, prompts, strict=False)], "samples/predictions.json", images="images",
              replace=True)
    if progress is not None:
        n_seq = summary["generated_sequences"]
        progress(n_seq, n_seq, unit="sequence", accuracy=summary["accuracy"] if summary["accuracy"] is not None
                 else summary["pass_at_1"])
    print(f"[eval] {c.mode} {c.model}: accuracy {summary['accuracy']}, pass@1 {summary['pass_at_1']:.3f} over "
          f"{summary['n']} items ({len(bad)} quarantined), {t2 - t1:.1f} s generating")
    return {"predictions": pred_path, "summary": stage_dir / "summary.json", **summary}
