"""Rewriters: the judge of self-distillation (METHOD.md section 4) that rewrites a wrong `<think>` chain so that
it reaches the ground truth.

Kinds (`REWRITERS`): `rule` (the miniature world's solver: it writes the reference chain from the row's meta, the
way `r1v.world.corpora` writes SFT chains), `openai` (any OpenAI-compatible chat endpoint, through the `openai`
scorer's client: same request body, retries, backoff and failure codes). A rewrite is never trusted: the stage
grades it and drops it when it misses the answer.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from r1v.core.judges import REWRITERS, RewriterConfig
from r1v.judges.base import Judge
from r1v.judges.openai_client import OpenAIScorer, OpenAIScorerConfig

NO_SOLVER = "no_solver"        # rule: the row carries no world problem (meta.digits, meta.expr) to solve
EMPTY_REWRITE = "empty_rewrite"  # the judge replied with nothing


@dataclass
class Rewrite:
    """The rewritten assistant turn (`<think>` chain and answer), or (text None) why there is none."""

    text: str | None = None
    reason: str = ""
    detail: str = ""

    @classmethod
    def fail(cls, reason: str, detail: str) -> Rewrite:
        return cls(None, reason, detail[:1000])


class Rewriter(Judge):
    """One rewriter kind. `rewrite(rows)`: per row (its messages end with the model's wrong assistant turn), the
    rewritten turn, in row order."""

    Config: ClassVar[type[RewriterConfig]]

    @abstractmethod
    def rewrite(self, rows: list[dict[str, Any]]) -> list[Rewrite]: ...


def make_rewriter(config: Any) -> Rewriter:
    return REWRITERS.get(config.kind)(config)


# ------------------------------------------------------------------------------------------------- openai

DEFAULT_REWRITE_PROMPT = (
    "A student's reasoning for the question below reaches a wrong answer. Rewrite the reasoning so that it is "
    "correct and reaches the reference answer, keeping what was right in it.\n\n"
    "Question:\n{question}\n\nReference answer: {answer}\n\nStudent's reasoning:\n{response}\n\n"
    "Reply in the form: <think>\\n(reasoning)\\n</think>\\nAnswer: \\boxed{{(answer)}}"
)


class OpenAIRewriterConfig(OpenAIScorerConfig):
    """An OpenAI-compatible chat endpoint as the judge (the `openai` scorer's settings; `{response}` in the
    prompt is the model's wrong turn; `score_pattern` is unused)."""

    prompt: str = Field(DEFAULT_REWRITE_PROMPT, description="user message template; fields: id, source, answer, "
                        "question, response (the wrong chain), meta")
    max_tokens: int = Field(2048, ge=1)


class OpenAIRewriter(Rewriter):
    """The `openai` scorer's client (request body, credentials, thread pool, `_attempt`'s failure codes), with
    the reply kept as text where the scorer parses a score from it."""

    Config = OpenAIRewriterConfig  # type: ignore[assignment]

    def __init__(self, config: OpenAIRewriterConfig) -> None:  # type: ignore[override]
        super().__init__(config)  # type: ignore[arg-type]
        self.client = OpenAIScorer(config, 0.0, 1.0)

    def open(self) -> None:
        self.client.open()

    def close(self) -> None:
        self.client.close()

    def stats(self) -> dict[str, float]:
        return self.client.stats()

    def rewrite(self, rows: list[dict[str, Any]]) -> list[Rewrite]:
        if self.client._pool is None:
            raise RuntimeError("OpenAIRewriter.rewrite before open()")
        return list(self.client._pool.map(self._one, rows))

    def _one(self, row: dict[str, Any]) -> Rewrite:
        # imported on use, to keep transformers, PIL, tokenizers out of light paths
        from r1v.data.prompt import THINK_OPENER

        text = self.client.reply(row)  # the scorer's retry schedule and failure codes
        if not isinstance(text, str):
            return Rewrite.fail(text.reason, text.detail)
        text = text.strip()
        if not text:
            return Rewrite.fail(EMPTY_REWRITE, "the judge's reply is empty")
        return Rewrite(text if text.startswith(THINK_OPENER.strip()) else THINK_OPENER + text)
