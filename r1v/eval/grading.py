"""Grade a predictions file against a benchmark: validation, (parallel) judging, report.

This is the library behind ``r1v eval grade``; the generation runner calls
:func:`grade_predictions` on its own
output.  Validation happens before any judging so that a malformed file grades nothing.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1v.eval.graders import Grader, categories_of, get_grader, gold_from_line
from r1v.eval.items import BenchItem
from r1v.eval.passk import pass_at_1
from r1v.eval.predictions import Prediction, PredictionsError, read_predictions
from r1v.grading.pool import run_bounded

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Verdict:
    """The judgement of one response; ``reason`` is ``correct``, ``wrong``, ``no_answer``, ``timeout`` or
    ``error: ...``."""

    id: str
    sample: int
    correct: bool
    extracted: str | None
    reason: str
    category: dict[str, Any] = field(default_factory=dict)


@dataclass
class GradeReport:
    """Counts, pass@1 over samples, per-category breakdown and the per-response verdicts."""

    benchmark: str
    verdicts: list[Verdict]
    missing: int = 0

    @property
    def correct(self) -> int:
        return sum(v.correct for v in self.verdicts)

    @property
    def total(self) -> int:
        return len(self.verdicts)

    def pass_at_1(self) -> tuple[float, float]:
        by_sample: dict[int, list[bool]] = defaultdict(list)
        for v in self.verdicts:
            by_sample[v.sample].append(v.correct)
        return pass_at_1(dict(sorted(by_sample.items())))

    def breakdown(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{key: {value: (correct, total)}}``; list-valued keys count the item once per value."""
        table: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for v in self.verdicts:
            for key, value in v.category.items():
                for val in value if isinstance(value, list) else [value]:
                    cell = table[key][str(val)]
                    cell[0] += v.correct
                    cell[1] += 1
        return {k: {val: (c[0], c[1]) for val, c in sorted(vals.items())} for k, vals in table.items()}

    def format(self) -> str:
        """Human-readable summary: accuracy with counts, pass@1 when there are several samples, breakdown."""
        acc = 100.0 * self.correct / self.total if self.total else 0.0
        lines = [f"{self.benchmark}: accuracy {acc:.2f}% ({self.correct}/{self.total})"]
        samples = {v.sample for v in self.verdicts}
        if len(samples) > 1:
            mean, std = self.pass_at_1()
            lines.append(f"pass@1 over {len(samples)} samples: {100 * mean:.2f}% ± {100 * std:.2f}")
        reasons: dict[str, int] = defaultdict(int)
        for v in self.verdicts:
            reasons[v.reason.split(":")[0]] += 1
        lines.append("verdicts: " + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())))
        if self.missing:
            lines.append(f"warning: {self.missing} benchmark items have no prediction")
        for key, vals in self.breakdown().items():
            lines.append(f"-- by {key}")
            for val, (c, t) in vals.items():
                lines.append(f"   {val:<40} {100.0 * c / t:6.2f}% ({c}/{t})")
        return "\n".join(lines)

    def write_jsonl(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            for v in self.verdicts:
                fh.write(json.dumps(asdict(v), ensure_ascii=False) + "\n")


# The job being graded.  Set before the worker processes fork: workers read it from inherited memory and only
# indices and verdicts cross the pipes (no pickling of items with long solutions or images).
_JOB: tuple[Grader, list[BenchItem], list[Prediction]] | None = None


def _judge_index(i: int) -> Verdict:
    assert _JOB is not None
    grader, items, preds = _JOB
    correct, extracted = grader.judge(items[i], preds[i], random.Random(0))
    return _verdict(items[i], preds[i], correct, extracted)


def _timeout_index(i: int) -> Verdict:
    assert _JOB is not None
    _, items, preds = _JOB
    return Verdict(preds[i].id, preds[i].sample, False, None, "timeout", categories_of(items[i]))


def _error_index(i: int, exc: BaseException) -> Verdict:
    assert _JOB is not None
    _, items, preds = _JOB
    return _error(items[i], preds[i], exc)


def _verdict(item: BenchItem, pred: Prediction, correct: bool, extracted: str | None) -> Verdict:
    reason = "correct" if correct else ("no_answer" if extracted in (None, "") else "wrong")
    return Verdict(pred.id, pred.sample, bool(correct), extracted, reason, categories_of(item))


def _error(item: BenchItem, pred: Prediction, exc: BaseException) -> Verdict:
    return Verdict(
        pred.id, pred.sample, False, None, f"error: {type(exc).__name__}: {exc}", categories_of(item)
    )


def resolve(grader: Grader, preds: list[Prediction], gold: dict[str, BenchItem]) -> list[BenchItem]:
    """Pair each prediction with its gold item; raise :class:`PredictionsError` naming every bad line."""
    problems, items = [], []
    for p in preds:
        if grader.gold_from_predictions:
            problem = grader.check(BenchItem(p.id, "", None), p)
            item = None if problem else gold_from_line(p)
        elif p.id not in gold:
            problem, item = f"unknown id {p.id!r} for benchmark {grader.name}", None
        else:
            item = gold[p.id]
            problem = grader.check(item, p)
        if problem:
            problems.append(f"{p.where}: {problem}")
        elif item is not None:
            items.append(item)
    if problems:
        raise PredictionsError(problems)
    return items


def grade_predictions(
    benchmark: str,
    predictions: str | os.PathLike[str] | list[Prediction],
    data_root: Path,
    *,
    dataset: Path | None = None,
    workers: int = 1,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> GradeReport:
    """Grade ``predictions`` (a path in any supported format, or parsed predictions) for ``benchmark``.

    ``workers`` processes judge in parallel with a ``timeout``-second bound per response; ``workers=0`` judges
    in this process without a bound (debugging).  Graders that must keep file order (MMMU) always run here.
    """
    grader = get_grader(benchmark)
    preds = predictions if isinstance(predictions, list) else read_predictions(predictions)
    gold = grader.load_gold(Path(data_root), dataset)
    items = resolve(grader, preds, gold)
    if not grader.bounded or workers <= 0:
        rng = grader.new_rng()
        verdicts = []
        for item, pred in zip(items, preds, strict=True):
            try:
                verdicts.append(_verdict(item, pred, *grader.judge(item, pred, rng)))
            except Exception as exc:  # a grader bug on one item is reported, not fatal
                verdicts.append(_error(item, pred, exc))
    else:
        global _JOB
        _JOB = (grader, items, preds)
        try:
            verdicts = run_bounded(
                range(len(items)),
                _judge_index,
                workers=workers,
                timeout=timeout,
                on_timeout=_timeout_index,
                on_error=_error_index,
            )
        finally:
            _JOB = None
    missing = 0 if grader.gold_from_predictions else len(set(gold) - {p.id for p in preds})
    return GradeReport(benchmark=benchmark, verdicts=verdicts, missing=missing)
