"""The `generate` stage's work: a model answers every row; per row, the extracted answer and whether it matched.

It runs on the eval stage's machinery (`r1v.eval.corpus`: the engine pool of Ray actors, batching and per-call
seeds, so results do not depend on the number of engines) and the graders of `r1v.grading.rewards`. Outputs:

- `corpus`: the input rows with `gen_answer` (the primary generation's extracted answer, null when it has none),
  `gen_correct` (it matched), `gen_n` (generations graded) and `gen_n_correct`; `select` reads E from it;
- `samples`: one row per generation (id, sample (-1: greedy), response, extracted, score, correct, n_tokens,
  grade_error: set when the grader raised or ran past its time bound, `r1v.judges.base.grade_bounded`; such a
  generation counts as not matched, and the summary counts them as `grade_failures`);
- `quarantine.parquet`: rows without an answer (`no_answer`) or that fail preprocessing (reason of the
  pipeline). Counts reconcile: rows in = rows out + quarantined.

The corpus is processed `chunk_rows` rows at a time, each chunk a part (`r1v.data.parts`), so a resumed stage
skips what it already generated.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.core.fs import atomic_write_json
from r1v.data.parts import PART, corpus_schema, iter_chunks, merge_quarantine, quarantine_table, run_parts, write_table
from r1v.data.pipeline import prepare_prompts
from r1v.data.reader import corpus_files
from r1v.data.schema import question
from r1v.grading.rewards import REWARDS, extract_answer
from r1v.judges.base import grade_bounded
from r1v.rounds.config import GenerateConfig

NO_ANSWER = "no_answer"
GEN_FIELDS = [pa.field("gen_answer", pa.string()), pa.field("gen_correct", pa.bool_()),
              pa.field("gen_n", pa.int32()), pa.field("gen_n_correct", pa.int32())]
SAMPLE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("answer", pa.string()),
                           ("sample", pa.int32()), ("response", pa.string()), ("extracted", pa.string()),
                           ("score", pa.float64()), ("correct", pa.bool_()), ("grade_error", pa.string()),
                           ("n_tokens", pa.int32())])


def _chunk(engine: Any, c: GenerateConfig, table: pa.Table, offset: int,
           progress: Callable[[float], None] | None = None) -> tuple[pa.Table, pa.Table, list[dict[str, Any]]]:
    """(rows with gen columns, samples, quarantine records) for one chunk; `progress(fraction)` as the engine's
    calls return."""
    # imported on use, to keep torch out of light paths
    from r1v.generation.service import GREEDY, generate_jobs

    rows = table.to_pylist()
    bad = [{"id": r["id"], "reason": NO_ANSWER, "detail": "the row has no answer to grade against",
            "source": r.get("source")} for r in rows if not str(r.get("answer") or "").strip()]
    answered = [{**r, "_row": i} for i, r in enumerate(rows) if str(r.get("answer") or "").strip()]
    prompts, failed = prepare_prompts(answered, c.model, c.preprocess)
    bad += failed
    grade = REWARDS.get(c.grader)
    jobs = ([({**c.sampling.model_dump(), **GREEDY}, 1)] if c.greedy else []) + (
        [(c.sampling.model_dump(), c.samples)] if c.samples else [])
    def on_calls(done: int, total: int, _finished: Any) -> None:
        progress(done / max(total, 1))

    outs = generate_jobs(engine, prompts, jobs, c.seed + offset, c.engine.max_batch, desc="generate",
                         progress=on_calls if progress is not None else None) if prompts else [[] for _ in jobs]
    comps = [[cp for out in outs for cp in out[i]] for i in range(len(prompts))]
    flat = [(cp.text, {"answer": p["answer"]}) for p, cs in zip(prompts, comps, strict=True) for cp in cs]
    grades = iter(grade_bounded(grade, flat))
    samples: list[dict[str, Any]] = []
    gen: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(prompts):
        first = -1 if c.greedy else 0
        graded = []
        for k, cp in enumerate(comps[i]):
            g = next(grades)
            ok = not isinstance(g, str) and g == 1.0
            graded.append((extract_answer(cp.text), ok))
            samples.append({"id": p["id"], "source": p.get("source"), "answer": p["answer"],
                            "sample": k + first, "response": cp.text, "extracted": graded[-1][0],
                            "score": None if isinstance(g, str) else g, "correct": ok,
                            "grade_error": g if isinstance(g, str) else None, "n_tokens": len(cp.token_ids)})
        gen[p["_row"]] = {"gen_answer": graded[0][0], "gen_correct": graded[0][1], "gen_n": len(graded),
                        "gen_n_correct": sum(ok for _, ok in graded)}
    kept = table.filter(pa.array([i in gen for i in range(len(rows))], pa.bool_()))
    order = sorted(gen)  # filter keeps row order
    for f in GEN_FIELDS:
        kept = kept.append_column(f, pa.array([gen[i][f.name] for i in order], f.type))
    return kept, pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), bad


def run_generate(c: GenerateConfig, stage_dir: Path, log: Any, actors: bool, keep_warm_s: float = 0.0,
                 progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Generate and grade `c.corpus` into `stage_dir` (see the module doc); returns outputs and the summary.
    `progress(step, total, unit=..., **metrics)` (a stage's `ctx.progress`) hears of the rows done (those of
    an earlier attempt included) and the primary accuracy of the rows generated so far."""
    # imported on use, to keep torch out of light paths
    from r1v.generation.service import open_engine

    stage_dir = Path(stage_dir)
    work, target, samples_dir = stage_dir / "work", stage_dir / "corpus", stage_dir / "samples"

    def produce(todo: set[int]) -> None:
        sizes = {k: t.num_rows for k, _, t in iter_chunks(c.corpus, c.chunk_rows, ["id"])}
        total, done = sum(sizes.values()), sum(n for k, n in sizes.items() if k not in todo)
        right = answered = 0

        def report(rows_done: float) -> None:
            if progress is not None:
                progress(int(rows_done), total, unit="row", accuracy=right / answered if answered else None)

        report(done)
        with open_engine(c.model, c, actors, keep_warm_s) as (engine, _):
            for k, off, table in iter_chunks(c.corpus, c.chunk_rows):
                if k not in todo:
                    continue
                rows, samples, bad = _chunk(engine, c, table, off,
                                            lambda f, n=table.num_rows, before=done: report(before + f * n))
                write_table(samples, work / f"samples-{k:05d}.parquet")
                write_table(quarantine_table(bad), work / f"quarantine-{k:05d}.parquet")
                write_table(rows, work / PART.format(k))  # last: marks the chunk done
                done += table.num_rows
                right += sum(rows.column("gen_correct").to_pylist())
                answered += rows.num_rows
                report(done)
                print(f"[generate] chunk {k}: {rows.num_rows} rows answered, {len(bad)} quarantined",
                      flush=True)

    def finish() -> None:
        if not any(work.glob("part-*.parquet")):  # an empty corpus: an empty version of it
            schema = corpus_schema(c.corpus)
            for f in GEN_FIELDS:
                schema = schema.append(f)
            write_table(SAMPLE_SCHEMA.empty_table(), work / "samples-00000.parquet")
            write_table(schema.empty_table(), work / PART.format(0))

    chunks = (k for k, _, _ in iter_chunks(c.corpus, c.chunk_rows, ["id"]))
    run_parts(work, target, chunks, produce, finish=finish, also=((samples_dir, "samples-*.parquet"),))
    quarantine = merge_quarantine(work, stage_dir / "quarantine.parquet")
    summary = summarize_generation(c, target, samples_dir, quarantine)
    atomic_write_json(stage_dir / "summary.json", summary)
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({f"quarantined_{k}": v for k, v in summary["quarantine_reasons"].items()})
    log.metrics(metrics, 0)
    log.dict(summary, "generate_summary.json")
    first = pq.ParquetFile(sorted(samples_dir.glob("*.parquet"))[0])
    shown = next(first.iter_batches(batch_size=20), pa.RecordBatch.from_pylist([], SAMPLE_SCHEMA)).to_pylist()
    log.table_rows(shown, "sample_generations.jsonl")
    log_sample_table(c, shown, log)
    print(f"[generate] {c.model}: {summary['rows_out']} rows, primary accuracy {summary['accuracy']}, "
          f"{summary['errors']} errors, {summary['quarantined']} quarantined", flush=True)
    return {**summary, "corpus": target, "samples": samples_dir, "quarantine": stage_dir / "quarantine.parquet",
            "summary": stage_dir / "summary.json"}


def log_sample_table(c: GenerateConfig, shown: list[dict[str, Any]], log: Any) -> None:
    """The shown samples for MLflow's table viewer, with their rows' question and image (they come from the first
    chunk, the only one read for this)."""
    if not shown:
        return
    cols = [k for k in ("id", "images", "messages") if k in corpus_schema(c.corpus).names]
    _, _, table = next(iter_chunks(c.corpus, c.chunk_rows, cols))
    rows = {r["id"]: r for r in table.to_pylist()}
    log.table([{**s, "question": question(rows.get(s["id"], {})), "images": rows.get(s["id"], {}).get("images")}
               for s in shown], "sample_generations.json", images="images", replace=True)


def summarize_generation(c: GenerateConfig, target: Path, samples_dir: Path, quarantine: pa.Table) -> dict[str, Any]:
    """Counts read back from the files written; rows in = rows out + quarantined, or an error."""
    rows_in = sum(pq.ParquetFile(f).metadata.num_rows for f in _files(c.corpus))
    t = pq.read_table(target, columns=["gen_correct", "gen_n", "gen_n_correct"])
    n = t.num_rows
    if rows_in != n + quarantine.num_rows:
        raise RuntimeError(f"counts do not reconcile: {rows_in} rows in, {n} answered + {quarantine.num_rows} "
                           "quarantined")
    correct = sum(t.column("gen_correct").to_pylist())
    gens = sum(t.column("gen_n").to_pylist())
    gens_ok = sum(t.column("gen_n_correct").to_pylist())
    errs = pq.read_table(samples_dir, columns=["grade_error"]).column("grade_error")
    return {"rows_in": rows_in, "rows_out": n, "quarantined": quarantine.num_rows,
            "quarantine_reasons": dict(sorted(Counter(quarantine.column("reason").to_pylist()).items())),
            "accuracy": correct / n if n else None, "errors": n - correct, "generations": gens,
            "generation_accuracy": gens_ok / gens if gens else None, "grade_failures": len(errs) - errs.null_count,
            "greedy": c.greedy, "samples": c.samples,
            "config": json.loads(c.model_dump_json(include={"model", "grader", "seed"}))}


def _files(corpus: str) -> list[Path]:
    return corpus_files(corpus)
