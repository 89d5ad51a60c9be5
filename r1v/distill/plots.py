"""Chain length against difficulty and against the DRLC penalty, before and after distillation.

"Before" is the input corpus's own assistant chains (the reference chains the corpus shipped with), "after" the
distilled corpus (`chain_tokens`: kept chains are the model's own, rewritten ones the judge's); both are counted
the same way, tokens after `<think>\\n` plus the end of turn. Difficulty is the row's `meta.level` where the
corpus has one (the miniature world's 1..3); without it only the penalty panel is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from r1v.data.pipeline import load_tokenizer

MAX_ROWS = 50_000
"""Rows read per corpus for the plot (the first ones): enough for the curves, bounded on a large corpus."""

KEPT, REWRITTEN = "kept", "rewritten"
"""The `distill` column of a distilled corpus: the model's own chain kept, or a judge's rewrite."""


def _level(meta: Any) -> float | None:
    """The row's difficulty level from its `meta` (JSON string or dict), or None."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    v = meta.get("level") if isinstance(meta, dict) else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _read(corpus: str | Path, columns: list[str]) -> list[dict[str, Any]]:
    # imported on use, to keep ray, pandas, tqdm out of light paths
    from r1v.data.reader import corpus_files

    rows: list[dict[str, Any]] = []
    for f in corpus_files(corpus):
        names = pq.read_schema(f).names
        rows += pq.read_table(f, columns=[c for c in columns if c in names]).to_pylist()
        if len(rows) >= MAX_ROWS:
            break
    return rows[:MAX_ROWS]


def reference_points(corpus: str | Path, tokenizer: Any, penalty_column: str = "penalty") -> dict[str, list]:
    """(level, penalty, tokens) of the corpus's last assistant turn, counted as the distill stage counts a chain."""
    # imported on use, to keep transformers, PIL, tokenizers out of light paths
    from r1v.data.prompt import THINK_OPENER

    lv, pen, tok = [], [], []
    for r in _read(corpus, ["messages", "meta", penalty_column]):
        msgs = r.get("messages") or []
        if not msgs or msgs[-1]["role"] != "assistant":
            continue
        body = str(msgs[-1]["content"]).removeprefix(THINK_OPENER)
        lv.append(_level(r.get("meta")))
        pen.append(r.get(penalty_column))
        tok.append(len(tokenizer(body, add_special_tokens=False)["input_ids"]) + 1)
    return {"level": lv, "penalty": pen, "tokens": tok}


def distilled_points(corpus: str | Path, which: str | None = None) -> dict[str, list]:
    """(level, penalty, tokens) of a distilled corpus; `which` keeps only `kept` or `rewritten` rows."""
    rows = [r for r in _read(corpus, ["meta", "distill", "chain_tokens", "distill_penalty"])
            if which is None or r.get("distill") == which]
    return {"level": [_level(r.get("meta")) for r in rows], "penalty": [r.get("distill_penalty") for r in rows],
            "tokens": [r["chain_tokens"] for r in rows]}


def ols_slope(x: list[float | None], y: list[float]) -> float | None:
    """Least-squares slope of y on x over the pairs whose x is known; None when x does not vary."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and math.isfinite(float(a))]
    if len(pairs) < 2:
        return None
    xs, ys = np.array(pairs, dtype=float).T
    var = float(((xs - xs.mean()) ** 2).sum())
    return float(((xs - xs.mean()) * (ys - ys.mean())).sum() / var) if var > 0 else None


def length_stats(points: dict[str, list]) -> dict[str, Any]:
    """Rows, mean tokens and mean penalty per level, OLS slopes (tokens per level, tokens per unit penalty)."""
    tok = points["tokens"]
    by_level: dict[str, float] = {}
    pen_by_level: dict[str, float] = {}
    for lv in sorted({v for v in points["level"] if v is not None}):
        key = str(int(lv)) if float(lv).is_integer() else str(lv)
        at = [i for i, v in enumerate(points["level"]) if v == lv]
        by_level[key] = float(np.mean([tok[i] for i in at]))
        pens = [float(points["penalty"][i]) for i in at if points["penalty"][i] is not None]
        if pens:
            pen_by_level[key] = float(np.mean(pens))
    return {"rows": len(tok), "tokens_mean": float(np.mean(tok)) if tok else None, "tokens_by_level": by_level,
            "penalty_by_level": pen_by_level,
            "slope_per_level": ols_slope(points["level"], tok),
            "slope_per_penalty": ols_slope(points["penalty"], tok)}


def plot_lengths(series: dict[str, dict[str, list]], path: Path, title: str = "") -> Path:
    """PNG of tokens against level (mean ± standard error per level) and against penalty (points and OLS line),
    one colour per series (label -> points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_level = any(v is not None for s in series.values() for v in s["level"])
    fig, axes = plt.subplots(1, 2 if has_level else 1, figsize=(11 if has_level else 5.5, 4), squeeze=False)
    ax_pen = axes[0][-1]
    for i, (label, s) in enumerate(series.items()):
        colour = f"C{i}"
        if has_level:
            lv = sorted({v for v in s["level"] if v is not None})
            ys = [[t for t, v in zip(s["tokens"], s["level"], strict=True) if v == x] for x in lv]
            means = [float(np.mean(y)) for y in ys]
            errs = [float(np.std(y, ddof=1) / math.sqrt(len(y))) if len(y) > 1 else 0.0 for y in ys]
            slope = ols_slope(s["level"], s["tokens"])
            axes[0][0].errorbar(np.array(lv) + 0.04 * (i - (len(series) - 1) / 2), means, yerr=errs, marker="o",
                                capsize=3, color=colour,
                                label=f"{label} (n={len(s['tokens'])}, {slope:+.1f} tok/level)" if slope is not None
                                else f"{label} (n={len(s['tokens'])})")
        pts = [(p, t) for p, t in zip(s["penalty"], s["tokens"], strict=True) if p is not None]
        if pts:
            px, py = np.array(pts, dtype=float).T
            ax_pen.scatter(px, py, s=6, alpha=0.35, color=colour, label=label)
            slope = ols_slope(list(px), list(py))
            if slope is not None:
                xs = np.linspace(px.min(), px.max(), 2)
                ax_pen.plot(xs, py.mean() + slope * (xs - px.mean()), color=colour, lw=1.5,
                            label=f"{label}: {slope:+.1f} tok/unit")
    if has_level:
        axes[0][0].set(xlabel="difficulty (meta.level)", ylabel="chain tokens (mean ± s.e.)",
                       title="chain length vs difficulty")
        axes[0][0].set_xticks(sorted({int(v) for s in series.values() for v in s["level"] if v is not None}))
        axes[0][0].legend(fontsize=7)
    ax_pen.set(xlabel="repetition penalty (DRLC)", ylabel="chain tokens", title="chain length vs penalty")
    ax_pen.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def distill_plots(corpus_in: str | Path, corpus_out: str | Path, model: str, stage_dir: Path, log: Any,
                  penalty_column: str = "penalty") -> dict[str, Any]:
    """Write STAGE/lengths.png and STAGE/lengths.json (the stats of each series), log both as artifacts (`plots/`)
    and the slopes as metrics; returns the stats."""
    series = {"before: input chains": reference_points(corpus_in, load_tokenizer(model), penalty_column),
              "after: distilled (all)": distilled_points(corpus_out),
              "after: kept (model's own)": distilled_points(corpus_out, KEPT),
              "after: rewritten (judge)": distilled_points(corpus_out, REWRITTEN)}
    series = {k: v for k, v in series.items() if v["tokens"]}
    stats = {k: length_stats(v) for k, v in series.items()}
    stage_dir = Path(stage_dir)
    png = plot_lengths(series, stage_dir / "lengths.png", title=f"{stage_dir.parent.parent.name} / {stage_dir.name}")
    js = Path(stage_dir) / "lengths.json"
    js.write_text(json.dumps(stats, indent=2))
    log.artifact(png, "plots")
    log.artifact(js, "plots")
    short = {"before: input chains": "before", "after: distilled (all)": "after"}
    log.metrics({f"{short[k]}_{m}": v[m] for k, v in stats.items() if k in short
                 for m in ("tokens_mean", "slope_per_level", "slope_per_penalty") if v[m] is not None}, 0)
    return {"png": png, "json": js, "stats": stats}
