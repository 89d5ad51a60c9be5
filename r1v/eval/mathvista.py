"""MathVista scoring, after lupantech/MathVista ``evaluation/calculate_score.py``.

The official pipeline first extracts an answer (GPT-4 over the response, stored as ``extraction`` in the
published outputs), then normalises it to the item's answer type and compares it with the gold string.
For our own outputs :func:`extract_answer` replaces the LLM extractor with the rules the official
``extract_answer.py`` applies before calling GPT (plain choice / number responses, ``The answer is "x".``),
preceded by the reasoning-model ``\\boxed{}`` answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from r1v.grading.extract import final_answer, strip_think


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert/delete/substitute cost 1), as ``Levenshtein.distance``."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def get_most_similar(prediction: str, choices: Sequence[str]) -> str:
    """The choice nearest by edit distance; ties go to the earliest choice, as upstream."""
    distances = [levenshtein(prediction, c) for c in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(
    extraction: object,
    choices: Sequence[str] | None,
    question_type: str,
    answer_type: str,
    precision: int | None,
) -> str | None:
    """Map an extraction onto the gold answer's form (option text, int, float at ``precision``, list)."""
    if question_type == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", text)
        if letter:
            text = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices or []))]
        if text in options:
            return choices[options.index(text)]  # type: ignore[index]
        return get_most_similar(text, choices or [""])
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))  # type: ignore[arg-type]
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if answer_type == "list":
        return str(extraction)
    return extraction if isinstance(extraction, str) or extraction is None else str(extraction)


def extract_answer(response: str, choices: Sequence[str] | None, question_type: str, answer_type: str) -> str:
    """Rule-based extraction for raw responses (the official quick rules, boxed answers first)."""
    boxed = final_answer(response)
    if boxed is not None:
        return re.sub(r"^\\text\{(.*)\}$", r"\1", boxed)
    text = strip_think(response).strip()
    if not text:
        return ""
    if question_type == "multi_choice" and choices and text in choices:
        return text
    for conv in (int, float):
        if answer_type == ("integer" if conv is int else "float"):
            try:
                return str(conv(text))
            except ValueError:
                pass
    m = re.search(r'The answer is "(.*)"\.', text) or re.search(r"answer is:?\s*\(?([^\n]+?)\)?\.?\s*$", text)
    if m:
        return m.group(1).strip()
    return text.splitlines()[-1].strip()


def grade_mathvista(
    extraction: object,
    gold: str,
    choices: Sequence[str] | None,
    question_type: str,
    answer_type: str,
    precision: int | None,
) -> tuple[bool, str | None]:
    """Official ``safe_equal(normalize_extracted_answer(...), answer)``; returns (correct, prediction)."""
    prediction = normalize_extracted_answer(extraction, choices, question_type, answer_type, precision)
    return prediction == gold, prediction
