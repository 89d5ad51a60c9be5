"""QDAM and VTIA scores per row, and the `distill.score` stage's work over a corpus (DRLC penalties included).

Per row (each raw score in [0, 1]; higher = deserves a longer chain):

    S_v = (1 - w_v) * image cue + w_v * (judge_v - min) / (max - min)      image clarity and necessity
    S_t = (1 - w_t) * question cue + w_t * (judge_t - min) / (max - min)   question quality, difficulty
    S_I = (1 - w_I) * integration cue + w_I * (judge_I - min) / (max - min)  vision-text integration

Without a configured judge, w = 0 and the score is its cue part alone (the `*_judge` column is null). Components
stay as columns (`COLUMNS`). Then, over the whole corpus, DRLC (`r1v.distill.drlc`): `s_*_norm` min-max
normalised, and `penalty`.

Two passes, so that normalisation sees the whole corpus: each input file is scored into `work/raw-*.parquet`
(its quarantine next to it); when all are there, the bounds are computed over them and each raw part becomes
`work/part-*.parquet` with the normalised columns and the penalty; the parts are published as `corpus/` in one
rename (`r1v.data.parts`). A resumed stage skips what is done. Counts reconcile: rows in = rows scored + rows
quarantined.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1v.core.fs import atomic_write_json
from r1v.core.judges import SCORERS
from r1v.data.parts import PART, check_fraction, merge_quarantine, run_parts, write_scored_part, write_table
from r1v.data.reader import corpus_files
from r1v.data.validate import IMAGE_DECODE
from r1v.distill import drlc
from r1v.distill.config import DistillScoreConfig, JudgeConfig
from r1v.distill.cues import (
    ImageCueParams,
    TextCueParams,
    decode_image,
    images_cues,
    integration_cues,
    question_cues,
)
from r1v.judges.base import Scorer, Verdict, row_fields
from r1v.rounds.scoring import check_range

SCORE_COLUMNS = ("s_v", "s_t", "s_i")
COLUMNS = (
    "s_v_images", "s_v_lapvar", "s_v_blur", "s_v_res", "s_v_aspect", "s_v_cue", "s_v_judge", "s_v",
    "s_t_words", "s_t_ops", "s_t_len", "s_t_ops_score", "s_t_reason", "s_t_cue", "s_t_judge", "s_t",
    "s_i_causal", "s_i_spatial", "s_i_objects", "s_i_domain", "s_i_what_where", "s_i_cue", "s_i_judge", "s_i",
)
"""Raw columns of pass 1 (float64; `*_judge` null without a judge)."""
DRLC_COLUMNS = ("s_v_norm", "s_t_norm", "s_i_norm", "penalty")
JUDGES = (("vision_judge", "s_v"), ("text_judge", "s_t"), ("integration_judge", "s_i"))


def mix(cue: float, judge: float | None, j: JudgeConfig | None) -> float:
    """A score from its cue part and (when configured) its judge part mapped to [0, 1]."""
    if j is None or judge is None:
        return cue
    return (1.0 - j.weight) * cue + j.weight * (judge - j.min_score) / (j.max_score - j.min_score)


def cue_row(row: dict[str, Any], ip: ImageCueParams, tp: TextCueParams) -> dict[str, float] | Verdict:
    """The cue components of one row (prefixed column names), or a `image_decode` failure."""
    imgs = []
    for k, data in enumerate(row.get("images") or []):
        try:
            imgs.append(decode_image(data))
        except Exception as e:  # noqa: BLE001  (any decoder error is the row's, recorded with its type)
            return Verdict.fail(IMAGE_DECODE, f"image {k}: {type(e).__name__}: {e}")
    q = row_fields(row)["question"]
    v, t, i = images_cues(imgs, ip), question_cues(q, tp), integration_cues(q, tp)
    out = {"s_v_images": float(len(imgs))}
    out.update({f"s_v_{k}": val for k, val in v.items()})
    out.update({f"s_t_{k}": val for k, val in t.items()})
    out.update({f"s_i_{k}": val for k, val in i.items()})
    return out


def score_rows(rows: list[dict[str, Any]], c: DistillScoreConfig, judges: dict[str, Scorer]
               ) -> list[dict[str, float | None] | Verdict]:
    """Per row, the `COLUMNS` values or the quarantine verdict; judges only see rows whose images decoded."""
    ip, tp = c.image_cues.params(), c.text_cues.params()
    out: list[dict[str, float | None] | Verdict] = [cue_row(r, ip, tp) for r in rows]
    for o in out:
        if isinstance(o, dict):
            o.update({f"{prefix}_judge": None for _, prefix in JUDGES})
    for field, prefix in JUDGES:
        jc: JudgeConfig | None = getattr(c, field)
        if jc is None:
            continue
        todo = [k for k, o in enumerate(out) if isinstance(o, dict)]  # not rows an earlier judge failed
        verdicts = judges[field].score([rows[k] for k in todo]) if todo else []
        if len(verdicts) != len(todo):
            raise RuntimeError(f"{field}: scorer {jc.scorer.kind} returned {len(verdicts)} verdicts for "
                               f"{len(todo)} rows")
        for k, verdict in zip(todo, verdicts, strict=True):
            verdict = check_range(verdict, jc.min_score, jc.max_score)
            if verdict.score is None:
                out[k] = Verdict.fail(verdict.reason, f"{field}: {verdict.detail}")
            else:
                out[k][f"{prefix}_judge"] = verdict.score  # type: ignore[index]
    for o in out:
        if isinstance(o, dict):
            for field, prefix in JUDGES:
                o[prefix] = mix(o[f"{prefix}_cue"], o[f"{prefix}_judge"], getattr(c, field))  # type: ignore[arg-type]
    return out


def score_file(c: DistillScoreConfig, judges: dict[str, Scorer], file: Path, out: Path, qout: Path) -> None:
    """Pass 1 over one input file: its rows with the raw `COLUMNS` into `out`, the rest into `qout`."""
    clash = [n for n in (*COLUMNS, *DRLC_COLUMNS) if n in pq.ParquetFile(file).schema_arrow.names]
    if clash:
        raise ValueError(f"corpus: {file} already has column(s) {clash}; score the corpus they came from")
    write_scored_part(file, out, qout, c.batch_rows, list(COLUMNS), lambda rows: score_rows(rows, c, judges))


def bounds(raw_parts: list[Path]) -> dict[str, tuple[float, float]]:
    """(min, max) of each raw score over all parts: the corpus-wide min-max bounds of DRLC."""
    cols = {n: [] for n in SCORE_COLUMNS}  # type: dict[str, list[np.ndarray]]
    for p in raw_parts:
        t = pq.read_table(p, columns=list(SCORE_COLUMNS))
        for n in SCORE_COLUMNS:
            cols[n].append(t.column(n).to_numpy(zero_copy_only=False))
    out = {}
    for n, arrs in cols.items():
        a = np.concatenate(arrs) if arrs else np.zeros(0)
        out[n] = (float(a.min()), float(a.max())) if a.size else (math.nan, math.nan)
    return out


def finish_part(c: DistillScoreConfig, raw: Path, out: Path, b: dict[str, tuple[float, float]]) -> None:
    """Pass 2 over one raw part: the normalised scores and the penalty appended."""
    t = pq.read_table(raw)
    norm = {n: drlc.normalise(t.column(n).to_numpy(zero_copy_only=False), *b[n]) for n in SCORE_COLUMNS}
    pen = drlc.penalty(norm["s_v"], norm["s_t"], norm["s_i"], c.alpha, c.beta, c.gamma)
    for n in SCORE_COLUMNS:
        t = t.append_column(pa.field(f"{n}_norm", pa.float64()), pa.array(norm[n], pa.float64()))
    write_table(t.append_column(pa.field("penalty", pa.float64()), pa.array(pen, pa.float64())), out)


def _stats(a: np.ndarray) -> dict[str, float | None]:
    if not a.size:
        return {"min": None, "mean": None, "max": None}
    return {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max())}


def summarize_quality(c: DistillScoreConfig, files: list[Path], target: Path, quarantine: pa.Table,
              b: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Counts (checked to reconcile), the normalisation bounds, and score/penalty distributions."""
    rows_in = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    t = pq.read_table(target, columns=[*SCORE_COLUMNS, *DRLC_COLUMNS])
    n = t.num_rows
    if rows_in != n + quarantine.num_rows:
        raise RuntimeError(f"counts do not reconcile: {rows_in} rows in, {n} scored + {quarantine.num_rows} "
                           "quarantined")
    arr = {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}
    pen = arr["penalty"]
    edges = np.round(np.arange(1.0, 2.0001, 0.1), 1)
    hist, _ = np.histogram(np.clip(pen, 1.0, 2.0), bins=edges)
    return {"rows_in": rows_in, "rows_scored": n, "quarantined": quarantine.num_rows,
            "quarantine_reasons": dict(sorted(Counter(quarantine.column("reason").to_pylist()).items())),
            "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma,
            "judges": {f: getattr(c, f).scorer.kind for f, _ in JUDGES if getattr(c, f) is not None},
            "bounds": {k: list(v) for k, v in b.items()},
            "stats": {k: _stats(v) for k, v in arr.items()},
            "penalty_histogram": {f"{lo:.1f}-{hi:.1f}": int(h) for lo, hi, h in zip(edges[:-1], edges[1:], hist,
                                                                                     strict=True)}}


def score_quality(c: DistillScoreConfig, stage_dir: Path, log: Any) -> dict[str, Any]:
    """Score `c.corpus` into `stage_dir/corpus` (both passes); returns the outputs and the summary."""
    stage_dir = Path(stage_dir)
    target, work = stage_dir / "corpus", stage_dir / "work"
    files = corpus_files(c.corpus)
    raw = [work / f"raw-{i:05d}.parquet" for i in range(len(files))]

    def produce(todo: set[int]) -> None:  # pass 1: raw cues and judge scores, file by file
        judges = {f: SCORERS.get(j.scorer.kind)(j.scorer, j.min_score, j.max_score)
                  for f, _ in JUDGES if (j := getattr(c, f)) is not None}
        for s in judges.values():
            s.open()
        try:
            for i in sorted(todo):
                score_file(c, judges, files[i], raw[i], work / f"quarantine-{i:05d}.parquet")
                print(f"[distill.score] {files[i].name} scored", flush=True)
        finally:
            for s in judges.values():
                s.close()

    def finish() -> None:  # pass 2: normalised over the whole corpus, the penalty from them
        b = bounds(raw)
        atomic_write_json(work / "bounds.json", b)
        for i in range(len(files)):
            part = work / PART.format(i)
            if not part.exists():
                finish_part(c, raw[i], part, b)

    run_parts(work, target, range(len(files)), produce, marker="raw-{:05d}.parquet", finish=finish)
    b = {k: tuple(v) for k, v in json.loads((work / "bounds.json").read_text()).items()}
    for p in raw:
        p.unlink(missing_ok=True)  # they duplicate the images; the published parts hold everything
    quarantine = merge_quarantine(work, stage_dir / "quarantine.parquet")
    summary = summarize_quality(c, files, target, quarantine, b)  # type: ignore[arg-type]
    check_fraction(summary["quarantined"], summary["rows_in"], c.max_quarantined_fraction, "over the corpus")
    atomic_write_json(stage_dir / "summary.json", summary)
    metrics: dict[str, float] = {k: v for k, v in summary.items() if isinstance(v, int) and not isinstance(v, bool)}
    metrics.update({f"quarantined_{k}": v for k, v in summary["quarantine_reasons"].items()})
    for col, st in summary["stats"].items():
        metrics.update({f"{col}_{k}": v for k, v in st.items() if v is not None})
    metrics.update({f"rows_penalty_{k}": v for k, v in summary["penalty_histogram"].items()})
    log.metrics(metrics, 0)
    log.dict(summary, "distill_score_summary.json")
    if quarantine.num_rows:
        log.table_rows(quarantine.slice(0, 200).to_pylist(), "quarantine_sample.jsonl")
    return {**summary, "corpus": target, "quarantine": stage_dir / "quarantine.parquet",
            "summary": stage_dir / "summary.json"}
