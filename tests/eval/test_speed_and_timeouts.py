"""Grading is fast and cannot hang: a per-item bound kills pathological work and grades it 'timeout'."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from r1v.eval.grading import grade_predictions
from r1v.eval.predictions import Prediction
from r1v.grading.pool import run_bounded

BENCH = Path(__file__).resolve().parents[2] / "bench" / "grading.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_grading", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_2500_math500_responses_are_graded_on_two_workers(bench_root):
    """Every response graded, none timed out; the speed is bench/grading.py's."""
    preds = _bench_module().make_math500_responses(bench_root, samples=5)
    assert len(preds) == 2500
    report = grade_predictions("math500", preds, bench_root, workers=2, timeout=10)
    assert report.total == 2500 and not any(v.reason == "timeout" for v in report.verdicts)
    by_sample = {k: sum(v.correct for v in report.verdicts if v.sample == k) for k in range(5)}
    assert by_sample[0] == 500 and by_sample[1] == 500 and by_sample[2] < 10
    mean, std = report.pass_at_1()
    assert 0 < mean < 1 and std > 0


def test_pathological_expressions_time_out_without_hanging(bench_root):
    tower = "9^{9^{9}}"  # SymPy works out all 369 million digits: no signal reaches it inside the big-int power
    nested = "\\frac{" * 400 + "1" + "}{2}" * 400
    preds = [
        Prediction(id="test/algebra/1072.json", response=f"Answer: \\boxed{{{tower}}}", sample=0),
        Prediction(id="test/algebra/1072.json", response=f"Answer: \\boxed{{{nested}}}", sample=1),
        Prediction(id="test/algebra/1072.json", response="Answer: \\boxed{9^{9^{9^{9}}} - 9^{9^{9^{9}}}+x}", sample=2),
    ]
    start = time.perf_counter()
    report = grade_predictions("math500", preds, bench_root, workers=2, timeout=1.5)
    assert time.perf_counter() - start < 90  # a hang, not a speed: the tower alone takes hours
    assert [v.correct for v in report.verdicts] == [False, False, False]
    assert report.verdicts[0].reason == "timeout"


def _slow(x: int) -> int:
    if x == 3:
        time.sleep(600)
    if x == 5:
        raise ValueError("boom")
    return x * x


def test_pool_kills_stuck_item_and_finishes_the_rest():
    start = time.perf_counter()
    out = run_bounded(
        list(range(10)),
        _slow,
        workers=2,
        timeout=0.5,
        on_timeout=lambda t: "timeout",
        on_error=lambda t, e: f"error {e}",
        chunk_size=4,
    )
    assert time.perf_counter() - start < 60  # a hang, not a speed
    assert out == [0, 1, 4, "timeout", 16, "error boom", 36, 49, 64, 81]
