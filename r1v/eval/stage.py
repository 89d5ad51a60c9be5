"""The `eval` stage on an r1v corpus with answers: generate K samples per item, grade, pass@1 over K.

Benchmarks (MMMU, MathVista, ...) go through `r1v.eval.runner`, which shares the generation half below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1v.config import EvalConfig
from r1v.fsutil import atomic_write_json, atomic_write_text


def generate_samples(model_dir: str, prompts: list[dict[str, Any]], c: EvalConfig) -> list[list[Any]]:
    """K completions per preprocessed prompt, from a rollout engine built in this process."""
    from tqdm import tqdm

    from r1v.rl.engines import ENGINES, Request

    engine = ENGINES.get(c.engine.kind)(model_dir, max_batch=c.engine.max_batch)
    per_call = max(1, c.engine.max_batch // c.samples)
    out: list[list[Any]] = []
    for start in tqdm(range(0, len(prompts), per_call), desc="eval generate", unit="batch"):
        chunk = prompts[start : start + per_call]
        reqs = [Request(p["input_ids"], p["pixel_values"], p["n_tiles"]) for p in chunk]
        out.extend(engine.generate(reqs, c.sampling.model_dump(), c.samples, c.seed + start))
    return out


def run_eval(c: EvalConfig, stage_dir: Path, log) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from r1v.data.pipeline import prepare_prompts
    from r1v.eval.passk import pass_at_1
    from r1v.rl.rewards import REWARDS

    if c.corpus is None:
        from r1v.eval.runner import run_benchmark

        return run_benchmark(c, stage_dir, log)
    grade = REWARDS.get(c.grader)
    rows = pq.read_table(c.corpus, columns=["id", "images", "messages", "answer", "source"]).to_pylist()
    rows = rows[: c.limit] if c.limit else rows
    prompts, bad = prepare_prompts(rows, c.model, c.preprocess)
    comps = generate_samples(c.model, prompts, c)
    preds, correct = [], []
    for p, group in zip(prompts, comps, strict=True):
        scores = [grade(cp.text, p) for cp in group]
        correct.append(scores)
        preds += [{"id": p["id"], "sample": j, "response": cp.text, "answer": p["answer"], "correct": s}
                  for j, (cp, s) in enumerate(zip(group, scores, strict=True))]
    runs = [[bool(r[j]) for r in correct] for j in range(c.samples)]
    mean, std = pass_at_1(runs) if correct else (0.0, 0.0)
    first = sum(r[0] for r in correct) / max(1, len(correct))
    summary = {"items": len(prompts), "quarantined": len(bad), "samples": c.samples, "pass_at_1": mean,
               "pass_at_1_std": std, "accuracy_first_sample": first,
               "mean_response_tokens": sum(len(cp.token_ids) for g in comps for cp in g) / max(1, len(preds))}
    pred_path = stage_dir / "predictions.jsonl"
    atomic_write_text(pred_path, "".join(json.dumps(p) + "\n" for p in preds))
    atomic_write_json(stage_dir / "summary.json", summary)
    log.metrics({k: v for k, v in summary.items() if isinstance(v, int | float)}, 0)
    log.artifact(pred_path)
    log.dict(summary, "summary.json")
    print(f"[eval] {summary}")
    return {"predictions": pred_path, "summary": stage_dir / "summary.json", **summary}
