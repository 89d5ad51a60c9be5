"""Selection arithmetic: D_t = {x : score(x) >= tau} U E_{t-1}, de-duplicated, with counts that reconcile."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pytest
from score_corpora import read, row

from r1v.rounds.config import SelectConfig
from r1v.rounds.select import BY_ERROR, BY_SCORE, Row, plan, run_select, totals
from r1v.workflow import tracking

LOG = tracking.RunLogger(None, None)


def brute_force(corpus: list[Row], errors: list[Row], tau: float) -> set[str]:
    """The set the formula names, computed the plain way."""
    first: dict[str, Row] = {}
    for r in corpus:
        first.setdefault(r.key, r)
    by_score = {k for k, r in first.items() if r.score is not None and math.isfinite(r.score) and r.score >= tau}
    return by_score | {r.key for r in errors if r.error}


@pytest.mark.parametrize("seed", range(40))
def test_plan_equals_the_formula_and_counts_reconcile(seed: int) -> None:
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(rng.randint(1, 12))]
    scores = [None, math.nan, 0.0, 1.0, 2.0, 2.5, 3.0, 4.0, 4.99, 5.0]
    corpus = [Row(rng.choice(keys), rng.choice("ab"), score=rng.choice(scores)) for _ in range(rng.randint(0, 20))]
    errors = [Row(rng.choice(keys + ["new1", "new2"]), rng.choice("bc"), error=rng.random() < 0.6)
              for _ in range(rng.randint(0, 10))]
    tau = rng.choice([0.0, 2.0, 3.0, 4.5, 5.0])
    p = plan(corpus, errors, tau)
    picked = [r.key for r, x in zip(corpus, p.corpus_pick, strict=True) if x] + \
             [r.key for r, x in zip(errors, p.errors_pick, strict=True) if x]
    assert len(picked) == len(set(picked))  # de-duplicated
    assert set(picked) == brute_force(corpus, errors, tau)
    # A corpus row is taken by score exactly when its first occurrence scores >= tau.
    for r, x in zip(corpus, p.corpus_pick, strict=True):
        if x == BY_SCORE:
            assert r.score >= tau
        if x == BY_ERROR:
            assert not (r.score is not None and r.score >= tau)
            assert any(e.key == r.key and e.error for e in errors)
    tot = totals(p.counts)
    assert len(corpus) == sum(tot.get(k, 0) for k in ("kept_by_score", "dropped_below_tau", "dropped_duplicate",
                                                      "dropped_unscored")) + sum(x == BY_ERROR for x in p.corpus_pick)
    assert sum(e.error for e in errors) == sum(p.errors_pick) + tot.get("errors_already_kept", 0) \
        + tot.get("errors_duplicate", 0)
    assert len(picked) == tot.get("kept_by_score", 0) + tot.get("added_as_errors", 0)
    assert tot.get("not_errors", 0) == sum(not e.error for e in errors)


def test_the_paper_example_by_hand() -> None:
    corpus = [Row("a", "x", score=5), Row("b", "x", score=1), Row("c", "y", score=3), Row("a", "x", score=0),
              Row("d", "y", score=2)]
    errors = [Row("b", "x", error=True), Row("c", "y", error=True), Row("d", "y", error=False),
              Row("e", "z", error=True), Row("e", "z", error=True)]
    p = plan(corpus, errors, tau=3)
    assert p.corpus_pick == [BY_SCORE, BY_ERROR, BY_SCORE, None, None]
    assert p.errors_pick == [False, False, False, True, False]
    assert p.counts == {
        "x": {"added_as_errors": 1, "dropped_duplicate": 1, "errors_already_kept": 1, "kept_by_score": 1},
        "y": {"dropped_below_tau": 1, "errors_already_kept": 1, "kept_by_score": 1, "not_errors": 1},
        "z": {"added_as_errors": 1, "errors_duplicate": 1},
    }


def _gen(values: list[tuple[bool, int, int]]) -> dict[str, tuple[pa.DataType, list]]:
    return {"gen_answer": (pa.string(), ["x"] * len(values)),
            "gen_correct": (pa.bool_(), [v[0] for v in values]),
            "gen_n": (pa.int32(), [v[1] for v in values]),
            "gen_n_correct": (pa.int32(), [v[2] for v in values])}


def test_select_stage_writes_the_union_and_logs_counts(corpus_factory, tmp_path: Path) -> None:
    def r(id: str, source: str, q: str | None = None) -> dict:
        return row(id, source=source, question=q or f"question {id}")

    scored = corpus_factory([r("a", "s1"), r("b", "s1"), r("c", "s2"), r("a", "s1"), r("n", "s2"),
                             r("c2", "s2", "question c")],
                            extra={"rm_score": (pa.float64(), [4.0, 1.0, 2.0, 5.0, None, 0.0])}, files=2)
    gen = corpus_factory([r("b", "s1"), r("x", "s3"), r("a", "s1"), r("y", "s3")],
                         extra=_gen([(False, 3, 1), (False, 3, 0), (True, 3, 3), (True, 3, 2)]))
    c = SelectConfig(corpus=scored, tau=2, errors=gen)
    res = run_select(c, tmp_path / "sel", LOG)
    out = read(res["corpus"])
    assert [(x["id"], x["selected_by"]) for x in out] == [("a", "score"), ("b", "error"), ("c", "score"),
                                                          ("x", "error")]
    assert out[0]["rm_score"] == 4.0 and out[3]["rm_score"] is None  # an added error row has no score
    assert set(out[0]) == set(read(scored)[0]) | {"selected_by"}  # the corpus's columns, not generate's
    counts = json.loads(Path(res["counts"]).read_text())
    assert counts["rows_out"] == 4 and counts["corpus_rows"] == 6 and counts["error_rows"] == 2
    assert counts["totals"] == {"added_as_errors": 2, "dropped_below_tau": 1, "dropped_duplicate": 1,
                                "dropped_unscored": 1, "errors_already_kept": 1, "kept_by_score": 2,
                                "not_errors": 2}
    assert counts["by_source"]["s3"] == {"added_as_errors": 1, "not_errors": 1}
    assert [(x["id"], x["reason"]) for x in read(res["quarantine"])] == [("n", "no_score")]

    # any_wrong also takes y (2 of 3 right); by content, c2 (c's question under another id) is c's duplicate.
    res = run_select(c.model_copy(update={"error_if": "any_wrong", "dedup_by": "content", "tau": 0}),
                     tmp_path / "sel2", LOG)
    assert [x["id"] for x in read(res["corpus"])] == ["a", "b", "c", "x", "y"]
    tot = json.loads(Path(res["counts"]).read_text())["totals"]
    assert tot["dropped_duplicate"] == 2 and tot["kept_by_score"] == 3 and tot["added_as_errors"] == 2

    # all_wrong: only x (0 of 3 right) is an error.
    res = run_select(c.model_copy(update={"error_if": "all_wrong", "tau": 5}), tmp_path / "sel3", LOG)
    assert [(x["id"], x["selected_by"]) for x in read(res["corpus"])] == [("x", "error")]


def test_select_names_missing_columns(corpus_factory, tmp_path: Path) -> None:
    plain = corpus_factory([row("a")])
    with pytest.raises(ValueError, match="corpus: .* no column.*rm_score"):
        run_select(SelectConfig(corpus=plain, tau=3), tmp_path / "a", LOG)
    scored = corpus_factory([row("a")], extra={"rm_score": (pa.float64(), [3.0])})
    with pytest.raises(ValueError, match="errors: .* no column.*gen_correct"):
        run_select(SelectConfig(corpus=scored, tau=3, errors=plain), tmp_path / "b", LOG)
    res = run_select(SelectConfig(corpus=scored, tau=3.5), tmp_path / "c", LOG)  # nothing selected: empty corpus
    assert read(res["corpus"]) == []
