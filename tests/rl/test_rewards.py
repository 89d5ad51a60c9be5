"""Rewards: the accuracy reward uses the graders' math equivalence, and scoring never fails a GRPO step."""

from __future__ import annotations

import time

import pytest

from r1v.core.registry import Registry
from r1v.grading import rewards
from r1v.grading.rewards import accuracy, accuracy_quick, format_reward, score, score_safe


def _boxed(answer: str) -> str:
    return f"Let me work it out.\n</think>\nAnswer: \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("42", "42", 1.0),
        ("42.0", "42", 1.0),
        ("1,000", "1000", 1.0),
        ("$7$", "7", 1.0),
        ("41", "42", 0.0),
        ("4200", "42", 0.0),  # the graders' percentage reading (42 % = 0.42, 4200 %) is off for rewards
        ("0.42", "42", 0.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", 1.0),
        ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
        ("(x+1)^2", "x^2+2x+1", 1.0),
        ("\\frac{1}{3}", "0.5", 0.0),
        ("42)(43", "42", 0.0),  # a hedge the lenient parser would read as 42
        ("yes", "yes", 1.0),
        ("no", "yes", 0.0),
    ],
)
def test_accuracy_is_math_equivalence(answer, gold, expected):
    assert accuracy(_boxed(answer), {"answer": gold}) == expected


def test_accuracy_reads_only_the_final_answer():
    assert accuracy("\\boxed{42} is a draft\n</think>\nno box here", {"answer": "42"}) == 0.0
    assert accuracy(_boxed("42"), {"answer": ""}) == 0.0
    assert accuracy(_boxed("42"), {}) == 0.0
    assert accuracy("</think>\nAnswer: \\boxed{} ", {"answer": "0"}) == 0.0


def test_quick_path_decides_numbers_and_strings_and_leaves_latex_to_sympy():
    assert accuracy_quick(_boxed("42"), {"answer": "42"}) == 1.0
    assert accuracy_quick(_boxed("41"), {"answer": "42"}) == 0.0
    assert accuracy_quick("no answer", {"answer": "42"}) == 0.0
    assert accuracy_quick(_boxed("\\frac{1}{2}"), {"answer": "0.5"}) is None


def test_score_keeps_its_signature_and_weights():
    completions = [_boxed("42"), _boxed("\\frac{1}{2}"), "42"]
    samples = [{"answer": "42"}, {"answer": "0.5"}, {"answer": "42"}]
    total, per = score(completions, samples, {"accuracy": 2.0, "format": 0.5})
    assert per == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert total == [2.5, 2.5, 0.0]


def _raises(completion: str, sample: dict) -> float:
    if "bad" in completion:
        raise ZeroDivisionError("boom")
    return 1.0


def _sleeps(completion: str, sample: dict) -> float:
    if "slow" in completion:
        time.sleep(600)  # far past any bound below: returning early means it was cut off
    return 1.0


def _odd_values(completion: str, sample: dict) -> object:
    return {"nan": float("nan"), "text": "abc", "big": 10**400}.get(completion, 0.5)


@pytest.fixture
def test_rewards(monkeypatch) -> Registry:
    """A registry of misbehaving rewards next to the real ones (the module's own registry stays untouched)."""
    reg: Registry = Registry("reward")
    for name in ("accuracy", "format"):
        reg.register(name)(rewards.REWARDS.get(name))
    reg.register("raises")(_raises)
    reg.register("sleeps")(_sleeps)
    reg.register("odd")(_odd_values)
    monkeypatch.setattr(rewards, "REWARDS", reg)
    return reg


def test_failing_rewards_score_zero_and_are_counted(test_rewards):
    completions = ["ok", "bad", "nan", "text", "big", _boxed("42")]
    samples = [{"answer": "42"}] * len(completions)
    total, per, failures = score_safe(completions, samples, {"raises": 1.0, "odd": 1.0, "accuracy": 1.0})
    assert per["raises"] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert per["odd"] == [0.5, 0.5, 0.0, 0.0, 0.0, 0.5]
    assert per["accuracy"] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert total == [1.5, 0.5, 1.0, 1.0, 1.0, 2.5]
    assert failures == {
        "raises/error/ZeroDivisionError": 1,
        "odd/error/non_finite": 1,
        "odd/error/not_a_number:str": 1,
        "odd/error/not_a_number:int": 1,
    }


def test_a_stuck_reward_times_out_and_the_rest_are_scored(test_rewards):
    completions = ["a", "slow", "b", "c"]
    start = time.perf_counter()
    total, per, failures = score_safe(completions, [{}] * 4, {"sleeps": 1.0}, timeout=0.5)
    assert time.perf_counter() - start < 60  # a hang, not a speed, is what this catches
    assert per["sleeps"] == [1.0, 0.0, 1.0, 1.0]
    assert failures == {"sleeps/timeout": 1}


def test_pathological_latex_answer_times_out_instead_of_hanging_the_step():
    """SymPy works out all 369 million digits of 9^(9^9); no signal stops it, the killed worker does."""
    completions = [_boxed("9^{9^{9}}"), _boxed("\\frac{6}{2}"), _boxed("3")]
    start = time.perf_counter()
    total, per, failures = score_safe(completions, [{"answer": "3"}] * 3, {"accuracy": 1.0}, timeout=1.0)
    assert time.perf_counter() - start < 60  # a hang, not a speed, is what this catches
    assert per["accuracy"] == [0.0, 1.0, 1.0]
    assert failures == {"accuracy/timeout": 1}


def test_unknown_reward_is_a_configuration_error():
    with pytest.raises(KeyError, match="known: accuracy"):
        score_safe(["x"], [{}], {"acuracy": 1.0})


def test_thousand_plain_answers_are_scored_in_process(monkeypatch):
    """Integer answers (the miniature world's) never start a worker pool; their speed is bench/grading.py's."""
    import r1v.grading.rewards

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(r1v.grading.rewards, "run_bounded", no_pool)  # score_safe would count "accuracy/error/pool:..."
    completions = [_boxed(str(i % 50)) for i in range(1000)]
    samples = [{"answer": str(i % 40)} for i in range(1000)]
    total, per, failures = score_safe(completions, samples, {"accuracy": 1.0, "format": 0.5})
    assert sum(per["accuracy"]) == sum(1 for i in range(1000) if i % 50 == i % 40) and not failures
    assert format_reward(completions[0], {}) == 1.0


def test_a_pool_that_cannot_start_scores_zero_with_the_reason(monkeypatch):
    import r1v.grading.rewards

    def cannot_fork(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(r1v.grading.rewards, "run_bounded", cannot_fork)
    total, per, failures = score_safe([_boxed("\\frac{1}{2}"), _boxed("7")], [{"answer": "0.5"}, {"answer": "7"}],
                                      {"accuracy": 1.0})
    assert per["accuracy"] == [0.0, 1.0] and failures == {"accuracy/error/pool:OSError": 1}
