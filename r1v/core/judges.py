"""The judges' config part, shared by the stages that use judges (`score`, `distill.score`, `distill`): which plugin
a `scorer:` or `judge:` section names, validated by that plugin's own `Config` (`r1v.judges`).

Plugins are tables of dotted paths (imported when a config names them); a project's own plugin is added with
`SCORERS.register` / `REWRITERS.register`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from r1v.core.config import Strict
from r1v.core.registry import LazyRegistry, Registry

SCORERS: LazyRegistry[Any] = LazyRegistry("scorer", {
    "openai": "r1v.judges.openai_client:OpenAIScorer",
    "local": "r1v.judges.local:LocalScorer",
    "rule": "r1v.judges.rule:RuleScorer",
})
"""Scorers: turn corpus rows into verdicts (a score, or a reason why not)."""
REWRITERS: LazyRegistry[Any] = LazyRegistry("rewriter", {
    "rule": "r1v.world.rewriter:RuleRewriter",
    "openai": "r1v.judges.rewriters:OpenAIRewriter",
})
"""Rewriters: turn a wrong chain of thought into a corrected one (the distill stage's judge)."""


class ScorerConfig(Strict):
    """Fields every scorer has; each kind subclasses it (`kind` names the registered scorer)."""

    kind: str = Field(description="registered scorer: openai | local | rule (or a plugin's)")


class RewriterConfig(Strict):
    kind: str = Field(description="registered rewriter: rule | openai (or a plugin's)")


def plugin_config(registry: Registry[Any], value: Any, field: str) -> Any:
    """A plugin config dict (or instance) validated by its kind's `Config`; errors name `<field>.<key>`."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict) or "kind" not in value:
        raise ValueError(f"{field} must be a mapping with a `kind` ({', '.join(registry.names())})")
    try:
        cls = registry.get(str(value["kind"])).Config
    except KeyError as e:
        raise ValueError(f"{field}.kind: {e.args[0]}") from None
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise ValueError("; ".join(f"{field}.{'.'.join(str(x) for x in err['loc'])}: "
                                   f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())) from None


def scorer_config(value: Any) -> ScorerConfig:
    return plugin_config(SCORERS, value, "scorer")


def rewriter_config(value: Any) -> RewriterConfig:
    return plugin_config(REWRITERS, value, "judge")
