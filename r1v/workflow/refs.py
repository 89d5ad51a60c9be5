"""`@stage.output` references: how a stage's config names an upstream stage's output."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

REF = re.compile(r"^@([A-Za-z0-9_\-]+)\.([A-Za-z0-9_]+)$")
"""A whole string `@STAGE.OUTPUT`; the stage's output path replaces it when the stage runs."""


def walk(value: Any, fn: Callable[[str], Any]) -> Any:
    """`value` (nested dicts and lists) with `fn` applied to every string."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: walk(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [walk(v, fn) for v in value]
    return value


def refs(cfg: BaseModel) -> set[str]:
    """The stages that `cfg` refers to."""
    found: set[str] = set()

    def visit(s: str) -> str:
        if m := REF.match(s):
            found.add(m.group(1))
        return s

    walk(cfg.model_dump(mode="json"), visit)
    return found
