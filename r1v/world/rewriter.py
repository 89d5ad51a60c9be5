"""The `rule` rewriter: the miniature world's solver writes the reference chain from a row's meta (the way
`r1v.world.corpora` writes SFT chains), so the world's distill stage needs no judge model."""

from __future__ import annotations

from typing import Any, Literal

from r1v.core.judges import RewriterConfig
from r1v.judges.base import row_fields
from r1v.judges.rewriters import NO_SOLVER, Rewrite, Rewriter
from r1v.world.domain import Problem, reasoning_answer


class RuleRewriterConfig(RewriterConfig):
    """The miniature world's solver: exact, so the world's distill stage needs no judge model."""

    kind: Literal["rule"] = "rule"


class RuleRewriter(Rewriter):
    Config = RuleRewriterConfig

    def rewrite(self, rows: list[dict[str, Any]]) -> list[Rewrite]:
        return [self._one(r) for r in rows]

    @staticmethod
    def _one(row: dict[str, Any]) -> Rewrite:
        meta = row_fields(row)["meta"]
        digits, expr = str(meta.get("digits") or ""), str(meta.get("expr") or "")
        if len(digits) != 4 or not digits.isdigit() or not expr:
            return Rewrite.fail(NO_SOLVER, "the row's meta has no world problem (digits, expr)")
        try:
            p = Problem(tuple(int(d) for d in digits), expr, int(meta.get("level") or 0))  # type: ignore[arg-type]
            return Rewrite(reasoning_answer(p))
        except (KeyError, ValueError, IndexError) as e:
            return Rewrite.fail(NO_SOLVER, f"meta.expr {expr!r} does not parse: {type(e).__name__}: {e}")
