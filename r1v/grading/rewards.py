"""Rule-based rewards, registered by name: `(completion, sample) -> float`.

`completion` is the generated text after the prompt (which already opened `<think>\n`); `sample` is the corpus
row (it carries `answer`). Config picks rewards and weights, e.g. `rewards: {accuracy: 1.0, format: 0.5}`.

Scoring runs inside every GRPO step, so one bad completion must not end the step: :func:`score_safe` scores a
reward that raises, returns a non-finite value, or runs past a per-item time bound as 0 and counts the reason
(a reward failing on too many of a step's samples is the stage's to stop: :func:`check_failure_fraction`).
The bound is hard (SymPy can spend minutes inside one big-integer power where no signal reaches it), so work
that may be slow runs in forked worker processes (:func:`r1v.grading.pool.run_bounded`) that are killed when late.
A reward may carry a `quick` attribute, `(completion, sample) -> float | None`, that decides cheap cases in
this process; only the cases it leaves undecided (None) pay for a worker.  Rewards without one always go to
the workers.  A `warm_up` attribute, `() -> None`, runs once per process before the first workers fork, so
that what it loads lazily is inherited instead of loaded again by the workers of every step.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from r1v.core.errors import NotRetryable
from r1v.core.registry import Registry
from r1v.grading.extract import last_boxed
from r1v.grading.pool import run_bounded
from r1v.model.tokens import THINK_END, THINK_START

RewardFn = Callable[[str, dict[str, Any]], float]
QuickFn = Callable[[str, dict[str, Any]], "float | None"]
REWARDS: Registry[RewardFn] = Registry("reward")

DEFAULT_TIMEOUT_S = 5.0
"""Per-item bound on one reward call.  A wrong symbolic answer takes 25-170 ms of CPU (``equals``, ``simplify``);
the bound is there for hangs, with room for a loaded machine (Qwen2.5-Math's grader gives SymPy 1 s, the
benchmark graders here 10 s)."""
DEFAULT_WORKERS = 2


def extract_answer(completion: str) -> str | None:
    """The last `\\boxed{}` after the reasoning (text before `</think>` is ignored when the tag is there)."""
    tail = completion.split(THINK_END)[-1]
    return last_boxed(tail)


def _answer_pair(completion: str, sample: dict[str, Any]) -> tuple[str, str] | None:
    """(prediction, gold) normalised as the MATH grader does, or None when either is missing."""
    # imported on use, to keep sympy, latex2sympy2 out of light paths
    from r1v.grading.math_equal import strip_string

    got = extract_answer(completion)
    gold = str(sample.get("answer") or "")
    if got is None or not gold.strip():
        return None
    return strip_string(got), strip_string(gold)


def accuracy_quick(completion: str, sample: dict[str, Any]) -> float | None:
    """The accuracy when strings or plain numbers decide it (no SymPy), else None."""
    # imported on use, to keep sympy, latex2sympy2 out of light paths
    from r1v.grading.math_equal import quick_equal

    pair = _answer_pair(completion, sample)
    if pair is None:
        return 0.0
    verdict = quick_equal(*pair, include_percentage=False)
    return None if verdict is None else float(verdict)


@REWARDS.register("accuracy")
def accuracy(completion: str, sample: dict[str, Any]) -> float:
    """1 when the last boxed answer is mathematically equal to the ground truth, by the MATH-500 grader's rules
    (`\\frac{1}{2}` matches `0.5`), except that `42` does not match `0.42` or `4200` (no percentage reading)."""
    # imported on use, to keep sympy, latex2sympy2 out of light paths
    from r1v.grading.math_equal import math_equal

    quick = accuracy_quick(completion, sample)
    if quick is not None:
        return quick
    pair = _answer_pair(completion, sample)
    assert pair is not None  # accuracy_quick decides every missing answer
    return float(math_equal(*pair, include_percentage=False))


def _warm_up_accuracy() -> None:
    """Load what SymPy and the ANTLR parser load lazily on first use (about 0.25 s), once, before forking."""
    # imported on use, to keep sympy, latex2sympy2 out of light paths
    from r1v.grading.math_equal import math_equal

    math_equal("x^2+2x+1", "(x+1)^2")
    math_equal("\\frac{\\sqrt{2}}{2}", "0.7071")


accuracy.quick = accuracy_quick  # type: ignore[attr-defined]
accuracy.warm_up = _warm_up_accuracy  # type: ignore[attr-defined]


_FORMAT = re.compile(r"^(?!.*" + re.escape(THINK_START) + r").+?" + re.escape(THINK_END) + r".*\\boxed\{.+\}",
                     re.DOTALL)


@REWARDS.register("format")
def format_reward(completion: str, sample: dict[str, Any]) -> float:
    """1 for `reasoning </think> answer-with-\\boxed{}` (the prompt already opened `<think>`), else 0."""
    return float(bool(_FORMAT.match(completion)) and completion.count(THINK_END) == 1)


format_reward.quick = format_reward  # type: ignore[attr-defined]  # one regex: always decided in-process


def load_reward_modules(modules: list[str], needed: list[str]) -> None:
    """Import plugin modules (which register rewards), then check every needed reward exists."""
    import importlib

    for m in modules:
        importlib.import_module(m)
    for name in needed:
        REWARDS.get(name)  # raises KeyError listing the known rewards


# The batch being scored in workers.  Set before the workers fork: they read completions and samples from
# inherited memory, so only (reward, item) indices and outcomes cross the pipes, and plugin rewards registered
# in this process (or defined in a test) work without pickling.
_BATCH: tuple[list[RewardFn], list[str], list[dict[str, Any]]] | None = None
_BATCH_LOCK = threading.Lock()

Outcome = tuple[float, "str | None", "str | None"]
"""A reward value and, when the call failed, the reason it scores 0 (a metric key part) and what happened (for
an error message)."""

_MESSAGE_CHARS = 300


def _outcome(value: Any) -> Outcome:
    """Non-numbers and NaN/inf are failures worth 0, like exceptions (one NaN would poison a group's advantages)."""
    try:
        v = float(value)
    except Exception:  # TypeError, ValueError, OverflowError (10**400), or a broken __float__
        return 0.0, f"error/not_a_number:{type(value).__name__}", f"returned a non-number: {value!r:.200}"
    return (v, None, None) if math.isfinite(v) else (0.0, "error/non_finite", f"returned {v}")


def _call(task: tuple[int, int]) -> Outcome:
    assert _BATCH is not None
    fns, completions, samples = _BATCH
    return _outcome(fns[task[0]](completions[task[1]], samples[task[1]]))


def _on_timeout(task: tuple[int, int]) -> Outcome:
    return 0.0, "timeout", None


def _on_error(task: tuple[int, int], exc: BaseException) -> Outcome:
    return 0.0, f"error/{type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:_MESSAGE_CHARS]


_WARM: set[int] = set()


def _warm_up(fn: RewardFn) -> None:
    """Run `fn.warm_up` once per process; a failing warm-up only costs the speed it was meant to buy."""
    warm = getattr(fn, "warm_up", None)
    if warm is None or id(fn) in _WARM:
        return
    _WARM.add(id(fn))
    try:
        warm()
    except Exception:  # the calls it makes will fail (and be counted) in the workers if something is broken
        pass


def score_safe(completions: list[str], samples: list[dict[str, Any]], weights: dict[str, float], *,
               timeout: float = DEFAULT_TIMEOUT_S, workers: int = DEFAULT_WORKERS,
               errors: dict[str, str] | None = None
               ) -> tuple[list[float], dict[str, list[float]], dict[str, int]]:
    """Weighted total per completion, each reward's values, and failure counts `{"accuracy/timeout": 2, ...}`.

    Never raises for a reward's behaviour: a call that raises (`<reward>/error/<ExceptionType>`), returns a
    non-number or NaN/inf, or takes over `timeout` seconds (`<reward>/timeout`) scores 0; `failures` is empty
    when nothing failed.  `errors`, when given, receives each failing reward's first failure in completion
    order (`{"accuracy": "ValueError: ..."}`): what a stage that gives up on the reward reports.  An unknown
    reward name is a configuration error and raises `KeyError` (the stage checks names with
    :func:`load_reward_modules` before training starts).
    """
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    names = list(weights)
    fns = [REWARDS.get(n) for n in names]
    outcomes: dict[tuple[int, int], Outcome] = {}
    pending: list[tuple[int, int]] = []
    for r, fn in enumerate(fns):
        quick: QuickFn | None = getattr(fn, "quick", None)
        for i, (c, s) in enumerate(zip(completions, samples, strict=True)):
            if quick is None:
                pending.append((r, i))
                continue
            try:
                value = quick(c, s)
            except Exception as exc:  # a reward bug on one completion costs that completion, not the step
                outcomes[r, i] = _on_error((r, i), exc)
                continue
            if value is None:
                pending.append((r, i))
            else:
                outcomes[r, i] = _outcome(value)
    if pending:
        for r in sorted({r for r, _ in pending}):
            _warm_up(fns[r])
        global _BATCH
        with _BATCH_LOCK:
            _BATCH = (fns, completions, samples)
            try:
                results = run_bounded(pending, _call, workers=workers, timeout=timeout, on_timeout=_on_timeout,
                                      on_error=_on_error, chunk_size=8)
            except Exception as exc:  # no worker could start (out of memory, process limit): score 0, say why
                results = [(0.0, f"error/pool:{type(exc).__name__}",
                            f"no grading worker could start: {type(exc).__name__}: {exc}"[:_MESSAGE_CHARS])
                           ] * len(pending)
            finally:
                _BATCH = None
        outcomes.update(zip(pending, results, strict=True))
    per = {n: [outcomes[r, i][0] for i in range(len(completions))] for r, n in enumerate(names)}
    failures = Counter(f"{names[r]}/{reason}" for (r, _), (_, reason, _) in outcomes.items() if reason)
    if errors is not None:
        for (r, _), (_, reason, message) in sorted(outcomes.items(), key=lambda kv: kv[0][1]):
            if reason:
                errors.setdefault(names[r], f"timed out (over {timeout:g} s)" if reason == "timeout" else message)
    total = [sum(weights[n] * per[n][i] for n in names) for i in range(len(completions))]
    return total, per, dict(failures)


def score(completions: list[str], samples: list[dict[str, Any]], weights: dict[str, float]
          ) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total per completion, and each reward's raw values (for logging); see :func:`score_safe`."""
    total, per, _ = score_safe(completions, samples, weights)
    return total, per


class RewardFailureError(NotRetryable):
    """A reward failed on more of a step's samples than `max_reward_failure_fraction` allows."""


def failures_by_reward(failures: dict[str, float], names: list[str]) -> dict[str, float]:
    """`score_safe`'s failure counts (`{"accuracy/timeout": 2, "accuracy/error/ValueError": 1}`) per reward."""
    out = dict.fromkeys(names, 0.0)
    for key, n in failures.items():
        for name in names:
            if key == f"{name}/timeout" or key.startswith(f"{name}/error/"):
                out[name] += n
    return out


def check_failure_fraction(failed: dict[str, float], scored: float, bound: float, first_errors: dict[str, str],
                           where: str) -> None:
    """Raise `RewardFailureError` for the first reward that failed on more than `bound` of `scored` samples."""
    for name, n in failed.items():
        if scored > 0 and n / scored > bound:
            raise RewardFailureError(
                f"reward {name!r} failed on {n:.0f}/{scored:.0f} samples of {where} (> {bound * 100:g}%, "
                f"max_reward_failure_fraction): {first_errors.get(name, 'no message')}")
