"""The `distill` stage's work: multi-stage self-distillation (METHOD.md section 4).

Per corpus row, the current model writes one `<think>` chain at the row's repetition penalty (the DRLC
column; `r1v.generation.engines.Request.repetition_penalty`, honoured by both engines), over the tokens
`penalty_scope` names (prompt and chain, or the chain only); the grader checks its final answer against the
row's. A correct chain is kept as the row's new assistant turn (`distill = "kept"`: the model's own words); a
wrong one goes to the judge (`r1v.judges.rewriters`), whose rewrite is graded in turn and kept as
`distill = "rewritten"` when correct. Everything else is dropped with a reason in `dropped.parquet`: no answer, a
failed preprocessing, a bad penalty, a judge failure, a rewrite that still misses.

Outputs: `corpus` (the input's columns with the distilled assistant turn, `distill`, `chain_tokens`: tokens
generated after the prompt's `<think>\\n`, end of turn included, and `distill_penalty`), `dropped.parquet`,
`summary.json`, `lengths.png` / `lengths.json` (chain length against difficulty and penalty, before and
after: `r1v.distill.plots`, also MLflow artifacts under `plots/`); counts reconcile (kept + rewritten + dropped =
rows in) or the stage fails. The corpus is processed `chunk_rows` rows at a time, each chunk a part, so a resumed
stage skips what it already did.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.core.fs import atomic_write_json
from r1v.data.parts import PART, corpus_schema, iter_chunks, merge_quarantine, quarantine_table, run_parts, write_table
from r1v.data.pipeline import load_tokenizer, prepare_prompts
from r1v.data.reader import corpus_files
from r1v.distill.config import DistillConfig
from r1v.distill.plots import KEPT, REWRITTEN, distill_plots
from r1v.grading.rewards import REWARDS
from r1v.judges.base import grade_bounded
from r1v.judges.rewriters import Rewriter, make_rewriter

NO_ANSWER = "no_answer"
BAD_PENALTY = "bad_penalty"
REWRITE_WRONG = "rewrite_wrong"
DISTILL_FIELDS = [pa.field("distill", pa.string()), pa.field("chain_tokens", pa.int32()),
                  pa.field("distill_penalty", pa.float64())]


def generate_with_penalties(engine: Any, prompts: list[dict[str, Any]], sampling: dict[str, Any], seed: int,
                            batch: int, desc: str = "distill") -> list[Any]:
    """One completion per prompt, each at its prompt's `penalty` (`generate_jobs` with per-request penalties)."""
    # imported on use, to keep torch out of light paths
    from r1v.generation.service import generate_jobs

    (groups,) = generate_jobs(engine, prompts, [(sampling, 1)], seed, batch, desc, penalty_key="penalty")
    return [g[0] for g in groups]


def _penalty(row: dict[str, Any], c: DistillConfig) -> float | str:
    """The row's penalty, or why it has none usable."""
    v = row.get(c.penalty_column)
    if v is None:
        return c.default_penalty
    try:
        p = float(v)
    except (TypeError, ValueError):
        return f"{c.penalty_column} = {v!r} is not a number"
    return p if math.isfinite(p) and p > 0 else f"{c.penalty_column} = {v!r} is not a positive finite number"


def _with_turn(row: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """The row's messages with `text` as the final assistant turn (replacing one that is there)."""
    msgs = [dict(m) for m in row["messages"] or []]
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return [*msgs, {"role": "assistant", "content": text}]


def _chunk(engine: Any, judge: Rewriter, c: DistillConfig, table: pa.Table, offset: int, schema: pa.Schema
           ) -> tuple[pa.Table, list[dict[str, Any]], dict[str, int]]:
    """(distilled rows, dropped records, counters) for one chunk."""
    # imported on use, to keep transformers, PIL, tokenizers out of light paths
    from r1v.data.prompt import THINK_OPENER

    rows = table.to_pylist()
    dropped: list[dict[str, Any]] = []
    todo: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        p = _penalty(r, c)
        why = ((NO_ANSWER, "the row has no answer to grade against") if not str(r.get("answer") or "").strip()
               else (BAD_PENALTY, p) if isinstance(p, str) else None)
        if why:
            dropped.append({"id": r["id"], "reason": why[0], "detail": why[1], "source": r.get("source")})
        else:
            todo.append({**r, "_row": i, "penalty": p})
    prompts, failed = prepare_prompts(todo, c.model, c.preprocess)
    dropped += failed
    comps = generate_with_penalties(engine, prompts, c.sampling_dict(), c.seed + offset,
                                    c.engine.max_batch) if prompts else []
    grade = REWARDS.get(c.grader)
    grades = grade_bounded(grade, [(cp.text, {"answer": p["answer"]}) for p, cp in zip(prompts, comps, strict=True)])
    out: dict[int, dict[str, Any]] = {}
    wrong: list[tuple[dict[str, Any], Any]] = []
    for p, cp, g in zip(prompts, comps, grades, strict=True):
        if not isinstance(g, str) and g == 1.0:
            out[p["_row"]] = {"messages": _with_turn(p, THINK_OPENER + cp.text), "distill": KEPT,
                              "chain_tokens": len(cp.token_ids), "distill_penalty": p["penalty"]}
        else:
            wrong.append((p, cp))
    judge_rows = [{k: v for k, v in p.items() if k not in ("input_ids", "labels", "pixel_values")}
                  | {"messages": _with_turn(p, THINK_OPENER + cp.text)} for p, cp in wrong]
    rewrites = judge.rewrite(judge_rows) if judge_rows else []
    ok = [(p, rw) for (p, _), rw in zip(wrong, rewrites, strict=True) if rw.text is not None]
    for (p, _), rw in zip(wrong, rewrites, strict=True):
        if rw.text is None:
            dropped.append({"id": p["id"], "reason": rw.reason, "detail": rw.detail, "source": p.get("source")})
    regrades = grade_bounded(grade, [(rw.text, {"answer": p["answer"]}) for p, rw in ok])
    tok = load_tokenizer(c.model)
    for (p, rw), g in zip(ok, regrades, strict=True):
        if isinstance(g, str) or g != 1.0:
            dropped.append({"id": p["id"], "reason": REWRITE_WRONG, "source": p.get("source"),
                            "detail": f"grade {g}; rewrite: {rw.text[:500]!r}"})
            continue
        body = rw.text.removeprefix(THINK_OPENER)
        out[p["_row"]] = {"messages": _with_turn(p, THINK_OPENER + body), "distill": REWRITTEN,
                          "chain_tokens": len(tok(body, add_special_tokens=False)["input_ids"]) + 1,
                          "distill_penalty": p["penalty"]}
    order = sorted(out)
    new_rows = [{**{k: v for k, v in rows[i].items() if k in schema.names}, **out[i]} for i in order]
    counts = {"kept": sum(v["distill"] == KEPT for v in out.values()),
              "rewritten": sum(v["distill"] == REWRITTEN for v in out.values()), "judged": len(wrong)}
    return pa.Table.from_pylist(new_rows, schema=schema), dropped, counts


def output_schema(corpus: str) -> pa.Schema:
    """The input corpus's schema, its distill columns (from an earlier round) replaced by this stage's."""
    schema = corpus_schema(corpus)
    for f in DISTILL_FIELDS:
        if f.name in schema.names:
            schema = schema.remove(schema.get_field_index(f.name))
    for f in DISTILL_FIELDS:
        schema = schema.append(f)
    return schema


def run_distill(c: DistillConfig, stage_dir: Path, log: Any, actors: bool, keep_warm_s: float = 0.0
                ) -> dict[str, Any]:
    """Distill `c.corpus` into `stage_dir` (see the module doc); returns outputs and the summary."""
    # imported on use, to keep torch out of light paths
    from r1v.generation.service import open_engine

    stage_dir = Path(stage_dir)
    work, target = stage_dir / "work", stage_dir / "corpus"
    schema = output_schema(c.corpus)
    judge_stats: dict[str, float] = {}

    def produce(todo: set[int]) -> None:
        with open_engine(c.model, c, actors, keep_warm_s) as (engine, _), make_rewriter(c.judge) as judge:
            for k, off, table in iter_chunks(c.corpus, c.chunk_rows):
                if k not in todo:
                    continue
                rows, dropped, counts = _chunk(engine, judge, c, table, off, schema)
                write_table(quarantine_table(dropped), work / f"quarantine-{k:05d}.parquet")
                atomic_write_json(work / f"counts-{k:05d}.json", counts)
                write_table(rows, work / PART.format(k))  # last: marks the chunk done
                print(f"[distill] chunk {k}: {counts['kept']} kept, {counts['rewritten']} rewritten, "
                      f"{len(dropped)} dropped", flush=True)
            judge_stats.update(judge.stats())

    def finish() -> None:
        if not any(work.glob("part-*.parquet")):  # an empty corpus: an empty version of it
            write_table(schema.empty_table(), work / PART.format(0))

    run_parts(work, target, (k for k, _, _ in iter_chunks(c.corpus, c.chunk_rows, ["id"])), produce, finish=finish)
    dropped = merge_quarantine(work, stage_dir / "dropped.parquet")
    summary = summarize_distill(c, target, dropped, work)
    atomic_write_json(stage_dir / "summary.json", summary)
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({f"dropped_{k}": v for k, v in summary["drop_reasons"].items()})
    metrics.update(judge_stats)
    log.metrics(metrics, 0)
    log.dict(summary, "distill_summary.json")
    try:  # the figure is a view of finished work: a failure to draw it must not fail the distillation

        distill_plots(c.corpus, target, c.model, stage_dir, log, c.penalty_column)
    except Exception as e:  # noqa: BLE001
        print(f"[distill] length plots not drawn: {type(e).__name__}: {e}", flush=True)
    print(f"[distill] {c.model}: {summary['rows_in']} rows in, {summary['kept']} kept, {summary['rewritten']} "
          f"rewritten, {summary['dropped']} dropped", flush=True)
    if summary["rows_in"] and summary["dropped"] > c.max_dropped_fraction * summary["rows_in"]:
        raise RuntimeError(f"distill dropped {summary['dropped']} of {summary['rows_in']} rows, more than "
                           f"max_dropped_fraction {c.max_dropped_fraction}: {summary['drop_reasons']}")
    return {**summary, "corpus": target, "dropped_file": stage_dir / "dropped.parquet",
            "summary": stage_dir / "summary.json"}


def summarize_distill(c: DistillConfig, target: Path, dropped: pa.Table, work: Path) -> dict[str, Any]:
    """Counts read back from the files written; kept + rewritten + dropped = rows in, or an error."""
    rows_in = sum(pq.ParquetFile(f).metadata.num_rows for f in corpus_files(c.corpus))
    t = pq.read_table(target, columns=["distill", "chain_tokens", "distill_penalty"])
    kinds = Counter(t.column("distill").to_pylist())
    kept, rewritten = kinds.pop(KEPT, 0), kinds.pop(REWRITTEN, 0)
    if kinds or rows_in != kept + rewritten + dropped.num_rows:
        raise RuntimeError(f"counts do not reconcile: {rows_in} rows in, {kept} kept + {rewritten} rewritten + "
                           f"{dropped.num_rows} dropped (other labels: {dict(kinds)})")
    tokens, labels = t.column("chain_tokens").to_pylist(), t.column("distill").to_pylist()

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    judged = sum(json.loads(p.read_text())["judged"] for p in work.glob("counts-*.json"))
    return {"rows_in": rows_in, "kept": kept, "rewritten": rewritten, "dropped": dropped.num_rows,
            "judged": judged, "rows_out": t.num_rows,
            "drop_reasons": dict(sorted(Counter(dropped.column("reason").to_pylist()).items())),
            "kept_fraction": kept / rows_in if rows_in else None,
            "chain_tokens_mean": mean(tokens),
            "chain_tokens_kept_mean": mean([n for n, d in zip(tokens, labels, strict=True) if d == KEPT]),
            "chain_tokens_rewritten_mean": mean([n for n, d in zip(tokens, labels, strict=True) if d == REWRITTEN]),
            "penalty_mean": mean(t.column("distill_penalty").to_pylist()),
            "config": json.loads(c.model_dump_json(include={"model", "grader", "seed", "penalty_column",
                                                            "penalty_scope"})) | {"judge": c.judge.kind}}
