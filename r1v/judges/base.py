"""The scorer interface and registry: a scorer turns corpus rows into verdicts (a score, or a reason why not).

Why verdicts and not floats: a judge that replies garbage, times out or answers 500 must leave a record (the
row is quarantined with the reason), never a default score that would silently decide the row's fate.
"""

from __future__ import annotations

import json
import math
import re
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import Field, field_validator

from r1v.core.config import Strict
from r1v.core.judges import ScorerConfig
from r1v.grading.pool import run_bounded

# Quarantine reason codes of the score stage.
NO_RESPONSE = "no_response"          # the row has no assistant turn to score
UNPARSABLE = "unparsable_score"      # the judge replied, but no score could be read from the reply
OUT_OF_RANGE = "score_out_of_range"  # a score outside [min_score, max_score]
NON_FINITE = "non_finite_score"      # a reward head gave NaN or inf
TOO_LONG = "too_long"                # the scorer's input exceeds its max_length (never truncated silently)
TIMEOUT = "timeout"                  # every attempt timed out
HTTP_ERROR = "http_error"            # the server answered an error status (after retries where retryable)
BAD_REPLY = "bad_reply"              # the server answered 200 with a body that is not a chat completion
CONNECTION = "connection_error"      # the server could not be reached
GRADE_FAILED = "grade_failed"        # rule: the grader raised or ran past its time bound on the reference

TEMPLATE_FIELDS = ("id", "source", "answer", "question", "response", "meta")
"""Names a prompt template may use: `{question}`, `{response}`, `{answer}`, `{meta[level]}`, ..."""

DEFAULT_SCORE_PATTERN = (r"^\s*([0-9]+(?:\.[0-9]+)?)\s*$"
                         r"|\\boxed\{\s*([0-9]+(?:\.[0-9]+)?)\s*\}"
                         r"|[Ss]core\s*[:=]?\s*\**\s*([0-9]+(?:\.[0-9]+)?)")
"""A bare number, `\\boxed{N}`, or `Score: N`; the last match in the reply wins."""


@dataclass
class Verdict:
    """A score, or (score None) the quarantine reason and its detail."""

    score: float | None = None
    reason: str = ""
    detail: str = ""

    @classmethod
    def fail(cls, reason: str, detail: str) -> Verdict:
        return cls(None, reason, detail[:1000])


class Judge(ABC):
    """A judge plugin, a scorer or a rewriter: `Config` validates its settings (`r1v.core.judges`); `open` and
    `close` acquire and release what it needs (actors, connections, credentials), around its calls and on error;
    `stats` are counters for MLflow. Used as a context manager."""

    Config: ClassVar[type[Strict]]

    def __init__(self, config: Any) -> None:
        self.config = config

    def open(self) -> None:  # noqa: B027  (an optional hook)
        """Acquire resources before the first call."""

    def close(self) -> None:  # noqa: B027  (an optional hook)
        """Release what `open` acquired; called on success and on error."""

    def stats(self) -> dict[str, float]:
        """Counters for MLflow (requests, retries, ...)."""
        return {}

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Scorer(Judge):
    """One scorer kind: `score` maps rows to verdicts in row order.

    `low`/`high` are the stage's score range: a scorer whose raw output is unbounded (a reward head) maps into
    it; the stage quarantines any score outside it.
    """

    Config: ClassVar[type[ScorerConfig]]

    def __init__(self, config: ScorerConfig, low: float, high: float) -> None:
        super().__init__(config)
        self.low, self.high = low, high

    @abstractmethod
    def score(self, rows: list[dict[str, Any]]) -> list[Verdict]: ...


class TemplateMixin(Strict):
    """A prompt template over the row's text fields, checked at load."""

    prompt: str = Field(description="str.format template; fields: " + ", ".join(TEMPLATE_FIELDS))

    @field_validator("prompt")
    @classmethod
    def _known_fields(cls, v: str) -> str:
        check_template(v)
        return v


def check_template(template: str) -> None:
    """ValueError naming the first unknown field of a `str.format` template."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"not a valid format template: {e}") from None
    for name in names:
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if root not in TEMPLATE_FIELDS:
            raise ValueError(f"unknown template field {{{name}}}; known: {', '.join(TEMPLATE_FIELDS)}")


def uses_field(template: str, name: str) -> bool:
    """Whether a `str.format` template refers to field `name` (e.g. a judge prompt without `{response}` rates
    the question alone, so rows without a response are fine for it)."""
    return any(f is not None and re.split(r"[.\[]", f, maxsplit=1)[0] == name
               for _, f, _, _ in string.Formatter().parse(template))


def compile_pattern(pattern: str | None) -> re.Pattern[str]:
    """The score pattern (default `DEFAULT_SCORE_PATTERN`); it must have at least one group."""
    rx = re.compile(pattern or DEFAULT_SCORE_PATTERN, re.MULTILINE)
    if rx.groups < 1:
        raise ValueError("score_pattern needs a capturing group around the number")
    return rx


def parse_score(text: str, rx: re.Pattern[str]) -> float | None:
    """The number in the last match of `rx` (its first group that matched), or None."""
    found: float | None = None
    for m in rx.finditer(text):
        g = next((x for x in m.groups() if x is not None), None)
        if g is None:
            continue
        try:
            found = float(g)
        except ValueError:
            continue
    return found if found is not None and math.isfinite(found) else None


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("meta")
    if isinstance(raw, dict):
        return raw
    try:
        m = json.loads(raw or "{}")
    except (TypeError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def row_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The text fields templates see: the user turns (`question`), the last assistant turn (`response`, empty
    when there is none), `answer`, `id`, `source`, and `meta` parsed from JSON."""
    messages = list(row.get("messages") or [])
    users = [m["content"] for m in messages if m.get("role") == "user"]
    response = messages[-1]["content"] if messages and messages[-1].get("role") == "assistant" else ""
    return {"id": row.get("id") or "", "source": row.get("source") or "", "answer": row.get("answer") or "",
            "question": "\n\n".join(users), "response": response, "meta": _meta(row)}


def render(template: str, fields: dict[str, Any]) -> str:
    """`template` over `fields`; a missing meta key renders as empty rather than failing the batch."""

    class _Meta(dict):
        def __missing__(self, key: str) -> str:
            return ""

    return template.format(**{**fields, "meta": _Meta(fields.get("meta") or {})})


GRADE_TIMEOUT_S = 2.0
"""Per-item bound on one grader call (SymPy can run for minutes inside one big-integer power)."""


def grade_bounded(fn: Any, items: list[tuple[str, dict[str, Any]]], timeout: float = GRADE_TIMEOUT_S,
                  workers: int = 2) -> list[float | str]:
    """`fn(completion, sample)` per item: a float, or a failure reason (`timeout`, `error: Type: msg`).

    A grader's `quick` attribute (`r1v.grading.rewards`) decides the cheap cases here; the rest run in forked worker
    processes killed when late (`r1v.grading.pool.run_bounded`). Samples should carry only what grading needs.
    """
    out: list[float | str | None] = [None] * len(items)
    quick = getattr(fn, "quick", None)
    todo = []
    for i, (c, s) in enumerate(items):
        try:
            v = quick(c, s) if quick is not None else None
        except Exception as e:  # noqa: BLE001  (one bad item costs that item)
            v = f"error: {type(e).__name__}: {e}"[:300]
        if v is None:
            todo.append(i)
        else:
            out[i] = v
    if todo:
        res = run_bounded([items[i] for i in todo], lambda t: float(fn(*t)), workers=min(workers, len(todo)),
                          timeout=timeout, on_timeout=lambda t: f"timeout: over {timeout} s",
                          on_error=lambda t, e: f"error: {type(e).__name__}: {e}"[:300])
        for i, v in zip(todo, res, strict=True):
            out[i] = v
    return [v if isinstance(v, str) or math.isfinite(float(v)) else "error: non-finite grade"
            for v in out]  # type: ignore[arg-type]
