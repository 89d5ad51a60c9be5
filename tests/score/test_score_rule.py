"""The scorer registry, the `rule` scorer and the `score` stage's bookkeeping (new version, quarantine, resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from score_corpora import read, row

from r1v.core.config import ConfigError
from r1v.core.judges import SCORERS, ScorerConfig
from r1v.data.parts import TooManyQuarantined
from r1v.judges.base import Scorer, Verdict, compile_pattern, grade_bounded, parse_score
from r1v.rounds.config import ScoreConfig
from r1v.rounds.scoring import score_corpus
from r1v.workflow import tracking
from r1v.workflow.schema import validate_workflow

LOG = tracking.RunLogger(None, None)


def test_registry_has_each_kind_and_configs_name_fields() -> None:
    assert {"openai", "local", "rule"} <= set(SCORERS.names())

    def load(scorer: dict[str, Any]) -> None:
        validate_workflow({"name": "t", "stages": {"s": {"kind": "score",
                                                         "config": {"corpus": "c", "scorer": scorer}}}})

    for bad, msg in [({"kind": "nope"}, r"scorer.kind: unknown scorer 'nope'; known: local, openai, rule"),
                     ({"kind": "openai", "model": "m"}, r"scorer.base_url: Field required"),
                     ({"kind": "openai", "model": "m", "base_url": "x"}, r"scorer.base_url: .*http://"),
                     ({"kind": "openai", "model": "m", "base_url": "http://h", "prompt": "{q}"},
                      r"scorer.prompt: unknown template field \{q\}"),
                     ({"kind": "local", "model": "m", "head": "reward", "num_actors": 0}, r"scorer.num_actors"),
                     ({"kind": "rule", "min_chars": 9, "max_chars": 2}, r"min_chars 9 > max_chars 2")]:
        with pytest.raises(ConfigError, match=msg) as e:
            load(bad)
        assert "stages.s.config.scorer" in str(e.value)


def test_parse_score_takes_the_last_match() -> None:
    rx = compile_pattern(None)
    assert parse_score("3", rx) == 3 and parse_score(" 4.5\n", rx) == 4.5
    assert parse_score("first 2 then Score: 4", rx) == 4 and parse_score("\\boxed{1} ... \\boxed{5}", rx) == 5
    assert parse_score("no number here", rx) is None and parse_score("Score: many", rx) is None


def _rule(rows: list[dict[str, Any]], **cfg: Any) -> list[Verdict]:
    c = ScoreConfig(corpus="-", scorer={"kind": "rule", **cfg})
    return SCORERS.get("rule")(c.scorer, 0, 5).score(rows)


def test_rule_scores_correctness_format_and_length() -> None:
    rows = [row("good"), row("wrong", answer="8"),
            row("no_format", response="3 + 4 = 7, so \\boxed{7}"),
            row("long", response="<think>\n" + "x" * 50 + "\n</think>\n\\boxed{7}"),
            row("none", response=None)]
    v = _rule(rows, max_chars=40)
    assert [x.score for x in v[:4]] == [5.0, 2.0, 3.0, 4.0]  # right but unformatted: accuracy only
    assert v[4].score is None and v[4].reason == "no_response"
    with pytest.raises(ValueError, match="exceeds the score range"):
        _rule(rows, accuracy=5)


def test_score_stage_writes_a_new_version_and_quarantines(corpus_factory, tmp_path: Path) -> None:
    src = corpus_factory([row("a"), row("b", answer="9"), row("c", response=None), row("d")], files=2)
    before = {p.name: p.read_bytes() for p in Path(src).iterdir()}
    c = ScoreConfig(corpus=src, scorer={"kind": "rule"}, max_quarantined_fraction=0.5)
    res = score_corpus(c, tmp_path / "st", LOG)
    out = read(res["corpus"])
    assert [(r["id"], r["rm_score"]) for r in out] == [("a", 5.0), ("b", 2.0), ("d", 5.0)]
    assert [(r["id"], r["reason"]) for r in read(res["quarantine"])] == [("c", "no_response")]
    s = json.loads(Path(res["summary"]).read_text())
    assert s["rows_in"] == 4 == s["rows_scored"] + s["quarantined"]
    assert s["histogram"] == {"2": 1, "5": 2} and s["quarantine_reasons"] == {"no_response": 1}
    assert {p.name: p.read_bytes() for p in Path(src).iterdir()} == before  # the input is untouched
    with pytest.raises(ValueError, match="column: .* already has a column 'rm_score'"):
        score_corpus(c.model_copy(update={"corpus": str(res["corpus"])}), tmp_path / "again", LOG)
    with pytest.raises(TooManyQuarantined, match="1 of 4 rows quarantined"):
        score_corpus(c.model_copy(update={"max_quarantined_fraction": 0.1}), tmp_path / "strict", LOG)


class FlakyConfig(ScorerConfig):
    fail_on: str = ""


@SCORERS.register("test.flaky", replace=True)
class Flaky(Scorer):
    """Scores 1 per row, raising on row `fail_on` (a scorer that dies mid-stage); counts rows seen."""

    Config = FlakyConfig
    seen: list[str] = []

    def score(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        for r in rows:
            if r["id"] == self.config.fail_on:
                raise ConnectionError("judge went away")
            Flaky.seen.append(r["id"])
        return [Verdict(1.0) for _ in rows]


def test_score_stage_resumes_at_the_first_part_not_done(corpus_factory, tmp_path: Path) -> None:
    src = corpus_factory([row(i) for i in "abcdef"], files=3)
    c = ScoreConfig(corpus=src, scorer={"kind": "test.flaky", "fail_on": "c"}, batch_rows=1)
    with pytest.raises(ConnectionError):
        score_corpus(c, tmp_path / "st", LOG)
    assert Flaky.seen == ["a", "b"] and not (tmp_path / "st" / "corpus").exists()
    assert not list((tmp_path / "st" / "work").glob(".*tmp"))  # the failed part left no temp file
    Flaky.seen.clear()
    res = score_corpus(ScoreConfig(corpus=src, scorer={"kind": "test.flaky"}, batch_rows=1), tmp_path / "st", LOG)
    assert Flaky.seen == ["c", "d", "e", "f"]  # part 0 was not scored again
    assert [r["id"] for r in read(res["corpus"])] == list("abcdef")
    assert pq.ParquetFile(next(Path(res["corpus"]).glob("*.parquet"))).metadata.row_group(0).num_rows == 1


def _grader(completion: str, sample: dict[str, Any]) -> float:
    if completion == "slow":
        import time

        time.sleep(30)
    if completion == "boom":
        raise ValueError("bad")
    return float("nan") if completion == "nan" else float(completion == sample["answer"])


_grader.quick = lambda c, s: 1.0 if c == "fast" else None  # type: ignore[attr-defined]


def test_grading_is_bounded_and_failures_are_named() -> None:
    items = [(c, {"answer": "7"}) for c in ("fast", "7", "8", "slow", "boom", "nan")]
    got = grade_bounded(_grader, items, timeout=0.5)
    assert got[:3] == [1.0, 1.0, 0.0]
    assert got[3].startswith("timeout") and got[4] == "error: ValueError: bad" and got[5].startswith("error")
