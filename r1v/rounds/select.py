"""The `select` stage: D_t = {x in D : score(x) >= tau} U E_{t-1}, de-duplicated, with counts that reconcile.

Two passes over the inputs, so corpora need not fit in memory: the first reads only keys, scores, sources and
verdicts and decides every row (`plan`, a pure function the tests check); the second copies the chosen rows.

Categories, per source and in total (a row's source is its `source` column):
- scored corpus: `kept_by_score` (score >= tau), `added_as_errors` (below tau or unscored, but wrong last
  round), `dropped_below_tau`, `dropped_duplicate` (its key came earlier), `dropped_unscored` (null/NaN score
  and not an error: also quarantined, `no_score`). They sum to the corpus's rows.
- error corpus (rows of a `generate` output judged wrong by `error_if`): `added_as_errors` (its key is not in
  the scored corpus: e.g. a row the score stage quarantined), `errors_already_kept` (its key was taken from the
  scored corpus, by score or as an error), `errors_duplicate`. They sum to its error rows; its correct rows are
  counted as `not_errors`.
- out = kept_by_score + added_as_errors (both corpora).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.core.fs import atomic_write_json
from r1v.data.parts import corpus_schema, iter_chunks, publish, quarantine_table, write_table
from r1v.rounds.config import SelectConfig

BY_SCORE, BY_ERROR = "score", "error"
CORPUS_CATEGORIES = ("kept_by_score", "added_as_errors", "dropped_below_tau", "dropped_duplicate",
                     "dropped_unscored")
ERROR_CATEGORIES = ("added_as_errors", "errors_already_kept", "errors_duplicate")


@dataclass
class Row:
    """What the plan needs of a row."""

    key: str
    source: str
    id: str = ""
    score: float | None = None  # scored corpus
    error: bool = False         # error corpus: wrong per `error_if`


@dataclass
class Plan:
    corpus_pick: list[str | None]  # per scored-corpus row: BY_SCORE, BY_ERROR or None (dropped)
    errors_pick: list[bool]        # per error-corpus row: added (it is not in the scored corpus)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> category -> rows
    unscored: list[int] = field(default_factory=list)                 # corpus rows without a score


def plan(corpus: list[Row], errors: list[Row], tau: float) -> Plan:
    """Decide every row: the selection arithmetic, and counts that are checked to reconcile."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    wrong = {r.key for r in errors if r.error}
    taken: set[str] = set()
    seen: set[str] = set()
    pick: list[str | None] = []
    unscored: list[int] = []
    for i, r in enumerate(corpus):
        c = counts[r.source]
        if r.key in seen:
            c["dropped_duplicate"] += 1
            pick.append(None)
            continue
        seen.add(r.key)
        scored = r.score is not None and math.isfinite(r.score)
        if scored and r.score >= tau:
            c["kept_by_score"] += 1
            pick.append(BY_SCORE)
            taken.add(r.key)
        elif r.key in wrong:
            c["added_as_errors"] += 1
            pick.append(BY_ERROR)
            taken.add(r.key)
        elif scored:
            c["dropped_below_tau"] += 1
            pick.append(None)
        else:
            c["dropped_unscored"] += 1
            unscored.append(i)
            pick.append(None)
    err_pick: list[bool] = []
    err_seen: set[str] = set()
    for r in errors:
        c = counts[r.source]
        if not r.error:
            c["not_errors"] += 1
            err_pick.append(False)
            continue
        if r.key in err_seen:
            c["errors_duplicate"] += 1
            err_pick.append(False)
            continue
        err_seen.add(r.key)
        if r.key in taken:  # every corpus row with this key was taken: by score, or as this very error
            c["errors_already_kept"] += 1
            err_pick.append(False)
        else:
            c["added_as_errors"] += 1
            err_pick.append(True)
            taken.add(r.key)
    out = {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}
    p = Plan(pick, err_pick, out, unscored)
    reconcile(p, corpus, errors)
    return p


def reconcile(p: Plan, corpus: list[Row], errors: list[Row]) -> None:
    """The counts add up to the rows read and to the rows picked, or RuntimeError: a wrong count is a bug."""
    tot = totals(p.counts)
    checks = {
        "corpus rows": (len(corpus), sum(tot.get(k, 0) for k in CORPUS_CATEGORIES) - _added_from_errors(p)),
        "error rows": (sum(r.error for r in errors),
                       _added_from_errors(p) + tot.get("errors_already_kept", 0) + tot.get("errors_duplicate", 0)),
        "rows out": (sum(x is not None for x in p.corpus_pick) + sum(p.errors_pick),
                     tot.get("kept_by_score", 0) + tot.get("added_as_errors", 0)),
    }
    for what, (a, b) in checks.items():
        if a != b:
            raise RuntimeError(f"select counts do not reconcile: {what} {a} != {b} ({tot})")


def _added_from_errors(p: Plan) -> int:
    return sum(p.errors_pick)


def totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for c in counts.values():
        out.update(c)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- reading and writing


def content_key(row: dict[str, Any]) -> str:
    """A hash of what the model learns from: messages, images and answer."""
    h = hashlib.sha256()
    h.update(json.dumps(row.get("messages") or [], sort_keys=True).encode())
    for img in row.get("images") or []:
        h.update(hashlib.sha256(bytes(img)).digest())
    h.update(str(row.get("answer") or "").encode())
    return h.hexdigest()


def _is_error(row: dict[str, Any], rule: str) -> bool:
    if rule == "wrong":
        return not row["gen_correct"]
    if rule == "any_wrong":
        return row["gen_n_correct"] < row["gen_n"]
    return row["gen_n_correct"] == 0


def read_rows(path: str, c: SelectConfig, errors: bool) -> list[Row]:
    """The plan's view of a corpus, read in chunks (content keys need the images; nothing else is kept)."""
    names = set(corpus_schema(path).names)
    need = {"gen_correct", "gen_n", "gen_n_correct"} if errors else {c.score_column}
    missing = sorted(need - names)
    if missing:
        what = "errors" if errors else "corpus"
        hint = "a generate stage's corpus" if errors else f"a corpus with a {c.score_column!r} column (score_column)"
        raise ValueError(f"{what}: {path} has no column(s) {missing}: expected {hint}")
    cols = ["id", "source", *sorted(need)] + (["messages", "images", "answer"] if c.dedup_by == "content" else [])
    out = []
    for _, _, t in iter_chunks(path, 1024, cols):
        for r in t.to_pylist():
            key = content_key(r) if c.dedup_by == "content" else str(r["id"])
            if errors:
                out.append(Row(key, r.get("source") or "", str(r["id"]), error=_is_error(r, c.error_if)))
            else:
                out.append(Row(key, r.get("source") or "", str(r["id"]), score=r[c.score_column]))
    return out


def _write(path: str, mask: list[Any], schema: pa.Schema, work: Path, prefix: str) -> None:
    """Copy the rows of `path` whose mask entry is set, projected onto `schema`, with `selected_by`."""
    k = at = 0
    for _, _, t in iter_chunks(path, 1024):
        m = mask[at : at + t.num_rows]
        at += t.num_rows
        keep = [x is not None and x is not False for x in m]
        if not any(keep):
            continue
        t = t.filter(pa.array(keep, pa.bool_()))
        cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
                for f in schema if f.name != "selected_by"]
        by = [BY_SCORE if x == BY_SCORE else BY_ERROR for x, y in zip(m, keep, strict=True) if y]
        t = pa.Table.from_arrays([*cols, pa.array(by, pa.string())], schema=schema)
        write_table(t, work / f"part-{prefix}{k:05d}.parquet")
        k += 1


def run_select(c: SelectConfig, stage_dir: Path, log: Any) -> dict[str, Any]:
    """Plan, write `stage_dir/corpus` and `counts.json`, log the counts by source to MLflow."""
    stage_dir = Path(stage_dir)
    work, target = stage_dir / "work", stage_dir / "corpus"
    corpus = read_rows(c.corpus, c, errors=False)
    errors = read_rows(c.errors, c, errors=True) if c.errors else []
    p = plan(corpus, errors, c.tau)
    schema = corpus_schema(c.corpus)
    if "selected_by" in schema.names:
        schema = schema.remove(schema.get_field_index("selected_by"))
    schema = schema.append(pa.field("selected_by", pa.string()))
    if not target.exists():
        for old in work.glob("part-*.parquet"):  # a failed attempt's parts: the plan is cheap to redo
            old.unlink()
        _write(c.corpus, p.corpus_pick, schema, work, "a")
        if c.errors:
            _write(c.errors, p.errors_pick, schema, work, "b")
        if not any(work.glob("part-*.parquet")):
            write_table(schema.empty_table(), work / "part-a00000.parquet")
        publish(work, target)
    bad = [{"id": corpus[i].id, "reason": "no_score", "detail": f"corpus row {i}: {c.score_column} is null or NaN",
            "source": corpus[i].source} for i in p.unscored]
    write_table(quarantine_table(bad), stage_dir / "quarantine.parquet")
    tot = totals(p.counts)
    rows_out = pq.ParquetDataset(target).read(columns=["selected_by"]).num_rows
    summary = {"tau": c.tau, "rows_out": rows_out, "corpus_rows": len(corpus),
               "error_rows": sum(r.error for r in errors), "totals": tot, "by_source": p.counts}
    atomic_write_json(stage_dir / "counts.json", summary)
    metrics: dict[str, float] = {"rows_out": rows_out, "tau": c.tau, **tot}
    for src, cnt in p.counts.items():
        metrics.update({f"{k}/{_metric_name(src)}": v for k, v in cnt.items()})
    log.metrics(metrics, 0)
    log.dict(summary, "select_counts.json")
    print(f"[select] tau {c.tau}: {rows_out} rows ({tot.get('kept_by_score', 0)} by score, "
          f"{tot.get('added_as_errors', 0)} as errors), {tot.get('dropped_below_tau', 0)} dropped below tau",
          flush=True)
    return {**summary, "corpus": target, "counts": stage_dir / "counts.json",
            "quarantine": stage_dir / "quarantine.parquet"}


def _metric_name(source: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . space and /."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", source) or "unknown"
