"""Reasoning-model output handling shared by every grader.

R1V-style models think inside ``<think>...</think>`` and end with ``Answer: \\boxed{...}``.  Official scorers
were written for short answers, so before any benchmark-specific rule runs we drop the thinking (a boxed
expression inside it is a draft, not the answer) and locate the final boxed expression with brace matching
(regular expressions cannot match nested braces such as ``\\boxed{\\frac{1}{2}}``).
"""

from __future__ import annotations

import re

_THINK_CLOSE = "</think>"
_ANSWER_LINE = re.compile(r"answer\s*[:：]\s*\$*\s*\\boxed\s*\{", re.IGNORECASE)


def strip_think(text: str) -> str:
    """Return the text after the last ``</think>``; an unclosed ``<think>`` means no answer was given yet."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1]
    if "<think>" in text:
        return text.split("<think>", 1)[0]
    return text


def _braced_after(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``text[open_pos] == '{'``, or None when it never closes."""
    depth = 0
    for i in range(open_pos, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None.

    ``\\boxed 5`` (no braces, as some models write it) yields the token up to the next ``$`` or space.
    """
    best: str | None = None
    best_pos = -1
    for cmd in ("\\boxed", "\\fbox"):
        pos = text.rfind(cmd)
        if pos > best_pos:
            rest = pos + len(cmd)
            while rest < len(text) and text[rest] == " ":
                rest += 1
            if rest < len(text) and text[rest] == "{":
                content = _braced_after(text, rest)
            else:
                m = re.match(r"\s*([^\s$]+)", text[rest:])
                content = m.group(1) if m else None
            if content is not None:
                best, best_pos = content, pos
    return best


def final_answer(text: str) -> str | None:
    """The answer a reasoning model committed to: the ``Answer: \\boxed{}`` line, else the last box.

    Returns None when the visible (post-think) text has no boxed answer, so callers can fall back to their
    benchmark's own free-text rules.
    """
    visible = strip_think(text)
    matches = list(_ANSWER_LINE.finditer(visible))
    if matches:
        m = matches[-1]
        content = _braced_after(visible, m.end() - 1)
        if content is not None:
            return content.strip()
    boxed = last_boxed(visible)
    return boxed.strip() if boxed is not None else None
