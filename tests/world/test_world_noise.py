"""`data.world`'s sft_noise: flawed SFT chains in the configured fractions and kinds, seeded, graded apart by the
`rule` scorer (what the miniature's iterative SFT rounds threshold)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest

from r1v.core.config import ConfigError
from r1v.judges.rule import RuleScorer, RuleScorerConfig
from r1v.workflow.schema import validate_workflow
from r1v.world.corpora import (
    CLEAN_MAX_CHARS,
    FLAWS,
    OVERLONG_MIN_CHARS,
    add_noise,
    generate,
    problem_rows,
    slipped_steps,
)
from r1v.world.domain import make_problem

NOISE = {"wrong_answer": 0.2, "no_think_end": 0.05, "no_box": 0.1, "overlong": 0.1, "truncated": 0.05}
EXPECTED_SCORE = {None: 5.0, "overlong": 4.0, "no_think_end": 3.0, "wrong_answer": 2.0, "no_box": 1.0,
                  "truncated": 0.0}


def _rows(n: int = 200, seed: int = 0) -> list[dict]:
    return problem_rows(n, random.Random(seed), "train", True, "sft")


def _flaw(row: dict) -> str | None:
    return json.loads(row["meta"]).get("flaw")


def test_fractions_and_kinds_as_configured_and_seeded() -> None:
    clean = _rows()
    noisy = add_noise(_rows(), NOISE, seed=0)
    assert Counter(_flaw(r) for r in noisy) == {None: 100, "wrong_answer": 40, "no_box": 20, "overlong": 20,
                                                "no_think_end": 10, "truncated": 10}
    for a, b in zip(clean, noisy, strict=True):  # only the flawed rows' chains change; the label never does
        assert (a["id"], a["images"], a["answer"], a["messages"][0]) == (b["id"], b["images"], b["answer"],
                                                                         b["messages"][0])
        assert (a == b) == (_flaw(b) is None)
    again = add_noise(_rows(), NOISE, seed=0)
    assert again == noisy
    other = add_noise(_rows(), NOISE, seed=1)
    assert [_flaw(r) for r in other] != [_flaw(r) for r in noisy]


def test_rule_scorer_grades_each_flaw_apart() -> None:
    rows = add_noise(_rows(300), NOISE, seed=3)
    scorer = RuleScorer(RuleScorerConfig(max_chars=CLEAN_MAX_CHARS), 0.0, 5.0)
    scores = [v.score for v in scorer.score(rows)]
    by_flaw: dict[str | None, set[float]] = {}
    for r, s in zip(rows, scores, strict=True):
        by_flaw.setdefault(_flaw(r), set()).add(s)
    assert by_flaw == {k: {v} for k, v in EXPECTED_SCORE.items()}
    assert len(set(scores)) == 6
    assert CLEAN_MAX_CHARS < OVERLONG_MIN_CHARS


def test_a_slip_carries_to_the_final_answer() -> None:
    rng = random.Random(0)
    for _ in range(200):
        p = make_problem(rng, "train")
        assert slipped_steps(p, 0, 0) == p.steps()
        at = rng.randrange(len(p.steps()))
        assert abs(slipped_steps(p, at, 2)[-1][3] - p.answer) == 2  # carried (negated after a `- x * y`)


def test_generate_with_noise_changes_only_sft_and_config_is_checked(tmp_path) -> None:
    kw = {"n_align": 20, "n_sft": 40, "n_grpo": 10, "n_test": 9, "seed": 2}
    plain = generate(tmp_path / "a", **kw)
    noisy = generate(tmp_path / "b", **kw, sft_noise={"no_box": 0.25})
    for name in ("align", "grpo", "test"):
        assert pq.read_table(plain[name]).equals(pq.read_table(noisy[name]))
    flaws = Counter(_flaw(r) for r in pq.read_table(noisy["sft"]).to_pylist())
    assert flaws == {None: 30, "no_box": 10}

    def load(noise: object) -> None:
        validate_workflow({"name": "t", "stages": {"d": {"kind": "data.world", "config": {"sft_noise": noise}}}})

    for bad, msg in [({"wrong_answer": 0.8, "no_box": 0.3}, "sum to 1.1 > 1"), ({"typo": 0.1}, "typo"),
                     ({"overlong": 1.5}, "overlong")]:
        with pytest.raises(ConfigError, match=msg) as e:
            load(bad)
        assert "stages.d.config.sft_noise" in str(e.value)
    assert set(FLAWS) == set(EXPECTED_SCORE) - {None}
