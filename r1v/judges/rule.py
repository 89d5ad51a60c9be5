"""The `rule` scorer: a rule-based stand-in for the reward model, for tests and the miniature world.

It scores a row's reference response (its last assistant turn) by the rules GRPO rewards use: points for a
correct final answer (`r1v.grading.rewards` accuracy: the last `\\boxed{}` after `</think>` equals `answer`), for the
R1V format (reasoning, `</think>`, a boxed answer) and for reasoning of a sensible length. Why a proxy: the
paper's reward model is not released; this one is deterministic, needs no model, and separates good chains from
broken ones, so `select` has something real to threshold.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from r1v.grading.rewards import REWARDS
from r1v.judges.base import (
    GRADE_FAILED,
    NO_RESPONSE,
    Scorer,
    ScorerConfig,
    Verdict,
    grade_bounded,
    row_fields,
)
from r1v.model.tokens import THINK_END, THINK_START


class RuleScorerConfig(ScorerConfig):
    """Points per rule; their sum is the best score (it must fit the stage's range, usually 0..5)."""

    kind: Literal["rule"] = "rule"
    accuracy: float = Field(3.0, ge=0, description="points when the response's boxed answer equals `answer`")
    format: float = Field(1.0, ge=0, description="points for `reasoning </think> ... \\boxed{...}`")
    length: float = Field(1.0, ge=0, description="points when the reasoning has min_chars..max_chars characters")
    min_chars: int = Field(1, ge=0, description="shortest reasoning (text before </think>) that earns `length`")
    max_chars: int = Field(4000, ge=1, description="longest reasoning that earns `length`")

    @model_validator(mode="after")
    def _window(self) -> RuleScorerConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        if self.accuracy + self.format + self.length <= 0:
            raise ValueError("accuracy + format + length must be > 0")
        return self


def completion_of(response: str) -> str:
    """The response as a generated completion: the prompt already opened `<think>\\n`, so drop that opener."""
    text = response.lstrip()
    if text.startswith(THINK_START):
        text = text[len(THINK_START):].removeprefix("\n")
    return text


class RuleScorer(Scorer):
    Config = RuleScorerConfig

    def __init__(self, config: RuleScorerConfig, low: float, high: float) -> None:
        super().__init__(config, low, high)
        best = config.accuracy + config.format + config.length
        if best > high - low + 1e-9:
            raise ValueError(f"scorer: accuracy + format + length = {best} exceeds the score range "
                             f"[{low}, {high}]")

    def score(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """Accuracy is graded under a time bound (`grade_bounded`): a reference answer the grader cannot judge
        is quarantined (`grade_failed`), not scored as wrong."""
        c: RuleScorerConfig = self.config  # type: ignore[assignment]
        fields = [row_fields(r) for r in rows]
        todo = [i for i, f in enumerate(fields) if f["response"].strip()]
        items = [(completion_of(fields[i]["response"]), {"answer": fields[i]["answer"]}) for i in todo]
        grades = dict(zip(todo, grade_bounded(REWARDS.get("accuracy"), items), strict=True))
        out = []
        for i, f in enumerate(fields):
            if i not in grades:
                out.append(Verdict.fail(NO_RESPONSE, "the row has no assistant turn to score"))
                continue
            if isinstance(grades[i], str):
                out.append(Verdict.fail(GRADE_FAILED, f"accuracy of the reference response: {grades[i]}"))
                continue
            text = completion_of(f["response"])
            reasoning = text.split(THINK_END, 1)[0] if THINK_END in text else ""
            points = (c.accuracy * grades[i] + c.format * REWARDS.get("format")(text, f)
                      + c.length * float(c.min_chars <= len(reasoning.strip()) <= c.max_chars and THINK_END in text))
            out.append(Verdict(self.low + points))
        return out
