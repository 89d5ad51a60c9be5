"""`@stage.output` references (how a stage's config names an upstream stage's output) and the stage graph they and
`needs:` make."""

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


def ref_pairs(cfg: BaseModel) -> set[tuple[str, str]]:
    """The (stage, output) pairs that `cfg` refers to."""
    found: set[tuple[str, str]] = set()

    def visit(s: str) -> str:
        if m := REF.match(s):
            found.add((m.group(1), m.group(2)))
        return s

    walk(cfg.model_dump(mode="json"), visit)
    return found


def refs(cfg: BaseModel) -> set[str]:
    """The stages that `cfg` refers to."""
    return {stage for stage, _ in ref_pairs(cfg)}


def order(deps: dict[str, set[str]], source: str) -> list[str]:
    """The stages in an order where each comes after what it depends on (the declared order among equals); a
    ValueError naming the stages of a cycle."""
    out: list[str] = []
    done: set[str] = set()
    while len(out) < len(deps):
        ready = [n for n in deps if n not in done and deps[n] <= done]
        if not ready:
            raise ValueError(f"{source}: stages form a cycle among {sorted(set(deps) - done)}")
        out.append(ready[0])
        done.add(ready[0])
    return out
