"""Generate-and-grade on a benchmark: the ``eval`` stage with ``benchmark:`` set, and ``r1v eval run``.

Flow: load items (first ``limit``) -> paper prompts (:mod:`r1v.eval.prompts`) -> preprocess (bad items are
quarantined with a reason) -> K samples per item with the rollout engine -> ``predictions.jsonl`` -> grading
with the benchmark's official rules (:func:`r1v.eval.grading.grade_predictions`) -> ``verdicts.jsonl``,
``summary.json`` and MLflow metrics/artifacts.

Quarantined items stay in the denominator (one ``quarantined: REASON`` verdict per sample): an item the
harness could not pose is a question the model did not answer, and dropping it would inflate pass@1.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from r1v.core.fs import atomic_write_json, atomic_write_text
from r1v.eval.config import EvalConfig
from r1v.eval.items import BenchItem, default_data_root
from r1v.eval.loaders import load_benchmark
from r1v.eval.predictions import Prediction
from r1v.eval.prompts import item_to_row

# Benchmark names the runner accepts -> the grader that applies that benchmark's official rules.
GRADER_OF = {
    "math500": "math500",
    "aime24": "aime24",
    "aime25": "aime25",
    "mathvista": "mathvista",
    "mmmu": "mmmu",
    "mathv": "mathv",
    "mathv-testmini": "mathv",
}
VISION = frozenset({"mathvista", "mmmu", "mathv", "mathv-testmini"})
_NEEDS_IMAGES_HINT = {
    "mathvista": "pass --dataset with the official MathVista testmini Parquet (images are not shipped)",
    "mmmu": "pass --dataset with the official MMMU validation Parquet files",
    "mathv": "only the 304 testmini images are shipped: use benchmark 'mathv-testmini'",
}


def _attach_local_images(items: list[BenchItem], root: Path) -> None:
    """MATH-Vision ``test`` items whose image file is present under the data root get its bytes.

    The loader reads images only for ``testmini``; the shipped images cover those 304 ids, so the full
    split is evaluable on them and the rest are quarantined as ``missing_image`` rather than posed blind.
    """
    for it in items:
        rel = it.meta.get("image")
        if it.images is None and rel and (path := root / "mathv" / rel).is_file():
            it.images = [path.read_bytes()]


def load_benchmark_items(benchmark: str, data_root: Path, dataset: Path | None, limit: int | None) -> list[BenchItem]:
    """The first ``limit`` items of ``benchmark``; raises when a vision benchmark has no image at all."""
    if benchmark not in GRADER_OF:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(sorted(GRADER_OF))}")
    items = load_benchmark(benchmark, data_root, dataset)
    items = items[:limit] if limit else items
    if benchmark == "mathv":
        _attach_local_images(items, data_root)
    if not items:
        raise ValueError(f"benchmark {benchmark!r} has no items at {data_root}")
    if benchmark in VISION and not any(it.images for it in items):
        hint = _NEEDS_IMAGES_HINT.get(benchmark, "check the data root")
        raise ValueError(f"benchmark {benchmark!r}: none of the {len(items)} items has an image; {hint}")
    return items


def _pose(benchmark: str, items: list[BenchItem], c: EvalConfig
          ) -> tuple[list[tuple[BenchItem, dict[str, Any]]], list[dict[str, Any]]]:
    """(item, preprocessed prompt) for each item that preprocesses, and quarantine records for the rest."""
    # imported on use, to keep pyarrow, numpy out of light paths
    from r1v.data.pipeline import RowError, preprocess_row

    posed, bad = [], []
    for it in items:
        try:
            if benchmark in VISION and not it.images:
                raise RowError("missing_image", _NEEDS_IMAGES_HINT.get(benchmark, "the item has no image"))
            posed.append((it, preprocess_row(item_to_row(benchmark, it), c.model, c.preprocess,
                                             with_labels=False)))
        except RowError as e:
            bad.append({"id": it.id, "reason": e.reason, "detail": e.detail[:500]})
    return posed, bad


def _summary(benchmark: str, c: EvalConfig, report: Any, n_items: int, bad: list[dict[str, Any]],
             comps: list[list[Any]], seconds: dict[str, float]) -> dict[str, Any]:
    from collections import defaultdict

    mean, std = report.pass_at_1()
    per: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for v in report.verdicts:
        per[v.sample][0] += v.correct
        per[v.sample][1] += 1
    lengths = [len(cp.token_ids) for g in comps for cp in g]
    return {
        "benchmark": benchmark,
        "grader": GRADER_OF[benchmark],
        "model": c.model,
        "items": n_items,
        "graded_items": n_items - len(bad),
        "quarantined": len(bad),
        "quarantine_reasons": dict(Counter(b["reason"] for b in bad)),
        "samples": c.samples,
        "pass_at_1": mean,
        "pass_at_1_std": std,
        "correct": report.correct,
        "total": report.total,
        "per_sample": [{"sample": k, "correct": ct[0], "total": ct[1], "accuracy": ct[0] / ct[1]}
                       for k, ct in sorted(per.items())],
        "verdict_reasons": dict(Counter(v.reason.split(":")[0] for v in report.verdicts)),
        "breakdown": {key: {val: {"correct": ct, "total": t, "accuracy": ct / t}
                            for val, (ct, t) in vals.items()}
                      for key, vals in report.breakdown().items()},
        "mean_response_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
        "unfinished_fraction": (sum(not cp.finished for g in comps for cp in g) / len(lengths)
                                if lengths else 0.0),
        "sampling": c.sampling.model_dump(),
        "seconds": seconds,
    }


def run_benchmark(c: EvalConfig, stage_dir: Path, log: Any, dataset: Path | None = None,
                  data_root: Path | None = None, workers: int | None = None, actors: bool = False,
                  keep_warm_s: float = 0.0, progress: Any = None) -> dict[str, Any]:
    """Generate ``c.samples`` responses per item of ``c.benchmark``, grade them, write and log the results.

    ``data_root``/``dataset`` fall back to same-named config fields when the config has them, then to
    ``$R1V_BENCHMARKS`` / the shared data folder.  With ``actors`` the model runs in Ray actors as ``c.engine``
    asks, kept ``keep_warm_s`` seconds for a next eval (the eval stage), else in this process (``r1v eval run``).
    ``progress(step, total, unit=..., **metrics)`` (a stage's ``ctx.progress``) hears of the sequences generated,
    then of pass@1 once graded. Returns the written paths and the summary's fields.
    """
    # imported on use, to keep torch, sympy, latex2sympy2 out of light paths
    from r1v.eval.graders import categories_of
    from r1v.eval.grading import DEFAULT_TIMEOUT_S, GradeReport, Verdict, grade_predictions
    from r1v.generation.service import generate, open_engine

    if not c.benchmark:
        raise ValueError("run_benchmark needs an EvalConfig with 'benchmark' set")
    benchmark = c.benchmark
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    root = default_data_root(data_root or getattr(c, "data_root", None))
    dataset = dataset or getattr(c, "dataset", None)
    dataset = Path(dataset) if dataset else None
    workers = min(4, os.cpu_count() or 1) if workers is None else workers

    with open_engine(c.model, c, actors, keep_warm_s) as (engine, _):  # actors load while the items are posed
        t0 = time.monotonic()
        items = load_benchmark_items(benchmark, root, dataset, c.limit)
        posed, bad = _pose(benchmark, items, c)
        t1 = time.monotonic()
        print(f"[eval] {benchmark}: {len(items)} items, {len(posed)} posed, {len(bad)} quarantined, "
              f"{c.samples} samples each")
        def on_calls(done: int, total: int, _finished: Any) -> None:
            progress(done, total, unit="sequence")

        comps = (generate(engine, [p for _, p in posed], c.sampling.model_dump(), c.samples, c.seed,
                          c.engine.max_batch, progress=on_calls if progress is not None else None)
                 if posed else [])
        t2 = time.monotonic()

    preds: list[Prediction] = []
    lines = []
    for (it, _), group in zip(posed, comps, strict=True):
        if len(group) != c.samples:
            raise RuntimeError(f"the engine returned {len(group)} completions for item {it.id}, "
                               f"expected {c.samples}")
        for j, cp in enumerate(group):
            extra: dict[str, Any] = {"n_tokens": len(cp.token_ids), "finished": bool(cp.finished)}
            if benchmark == "mmmu" and it.choices:
                extra["options"] = list(it.choices)  # lets `r1v eval grade` re-grade without the Parquet
            lines.append({"id": it.id, "sample": j, "response": cp.text, **extra})
            preds.append(Prediction(id=it.id, response=cp.text, sample=j, where=f"{it.id}#{j}", extra=extra))
    pred_path = stage_dir / "predictions.jsonl"
    atomic_write_text(pred_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))

    graded = (grade_predictions(GRADER_OF[benchmark], preds, root, dataset=dataset, workers=workers,
                                timeout=DEFAULT_TIMEOUT_S).verdicts if preds else [])
    by_id = {it.id: it for it in items}
    held = [Verdict(b["id"], j, False, None, f"quarantined: {b['reason']}", categories_of(by_id[b["id"]]))
            for b in bad for j in range(c.samples)]
    report = GradeReport(benchmark=benchmark, verdicts=graded + held, missing=0)
    t3 = time.monotonic()

    verdict_path = stage_dir / "verdicts.jsonl"
    atomic_write_text(verdict_path, "".join(json.dumps(asdict(v), ensure_ascii=False) + "\n"
                                            for v in report.verdicts))
    out: dict[str, Any] = {"predictions": pred_path, "verdicts": verdict_path}
    if bad:
        out["quarantine"] = stage_dir / "quarantine.jsonl"
        atomic_write_text(out["quarantine"], "".join(json.dumps(b) + "\n" for b in bad))
    seconds = {"prepare": t1 - t0, "generate": t2 - t1, "grade": t3 - t2}
    summary = _summary(benchmark, c, report, len(items), bad, comps, seconds)
    out["summary"] = stage_dir / "summary.json"
    atomic_write_json(out["summary"], summary)
    (stage_dir / "report.txt").write_text(report.format() + "\n", encoding="utf-8")

    log.metrics({k: summary[k] for k in ("pass_at_1", "pass_at_1_std", "correct", "total", "items",
                                         "quarantined", "mean_response_tokens", "unfinished_fraction")}, 0)
    for row in summary["per_sample"]:  # one point per sample: the spread behind pass_at_1_std
        log.metrics({"sample_accuracy": row["accuracy"]}, row["sample"])
    log.metrics({f"gen_seconds_{k}": v for k, v in seconds.items()}, 0)
    for path in out.values():
        log.artifact(path)
    log.artifact(stage_dir / "report.txt")
    verdict = {(v.id, v.sample): v for v in report.verdicts}
    shown = [x for x in lines if x["sample"] == 0][:50]  # first samples, with the item's image, for MLflow
    log.table([{"id": x["id"], "question": by_id[x["id"]].question[:2000], "answer": str(by_id[x["id"]].answer),
                "response": x["response"], "correct": getattr(verdict.get((x["id"], 0)), "correct", None),
                "images": by_id[x["id"]].images} for x in shown], "samples/predictions.json", images="images",
              replace=True)
    if progress is not None:
        n_seq = len(posed) * c.samples
        progress(n_seq, n_seq, unit="sequence", pass_at_1=summary["pass_at_1"])
    return {**out, "report": report, **{k: summary[k] for k in ("pass_at_1", "pass_at_1_std", "items",
                                                                 "quarantined", "samples")}}


# --------------------------------------------------------------------------- CLI: r1v eval run
