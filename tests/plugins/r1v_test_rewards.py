"""A reward plugin loaded through `grpo.reward_modules` (the same way users add their own rewards).

`digits` is learnable by a tiny random model: its completions already contain some digit characters, so
groups have reward variance from the first step, and more digits is a direction the policy can move in.
"""

from __future__ import annotations

from typing import Any

from r1v.grading.rewards import REWARDS


@REWARDS.register("digits", replace=True)
def digits(completion: str, sample: dict[str, Any]) -> float:
    """Fraction of non-space characters that are digits."""
    chars = [ch for ch in completion if not ch.isspace()]
    return sum(ch.isdigit() for ch in chars) / len(chars) if chars else 0.0


@REWARDS.register("broken_parser", replace=True)
def broken_parser(completion: str, sample: dict[str, Any]) -> float:
    """A grader that raises on every completion (a reward whose dependency is broken)."""
    raise ValueError(f"cannot parse answer {sample.get('answer')!r}: grammar not loaded")
