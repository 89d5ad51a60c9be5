"""MMMU scoring, after MMMU-Benchmark/MMMU ``eval/eval_utils.py`` and its two drivers
(``main_parse_and_eval.py`` for raw responses, ``main_eval_only.py`` for parsed predictions).

Multiple choice: ``(A)`` mentions, then `` A `` mentions, then option texts (responses over five words); the
last mention wins; when nothing parses, a random letter from a ``random.seed(42)`` stream.  That stream is
shared by the whole run in file order, so the caller passes one :class:`random.Random` and grades in order.
Open answers: key sub-responses after "is", "therefore", "answer"... plus every number in them; numbers
compare rounded to 2 decimals, strings by containment.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

MMMU_SEED = 42
DOMAINS: dict[str, list[str]] = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
SUBJECT_DOMAIN = {s: d for d, subjects in DOMAINS.items() for s in subjects}


def subject_of(item_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory`` (the official grouping rule)."""
    return "_".join(item_id.split("_")[1:-1])


def parse_multi_choice_response(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random
) -> str:
    """Official multiple-choice parser; ``rng`` supplies the fallback when no option is found."""
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    candidates: list[str] = []
    with_brackets = False
    by_index = True
    for choice in all_choices:
        if f"({choice})" in response:
            candidates.append(choice)
            with_brackets = True
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                by_index = False
    if not candidates:
        return rng.choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if by_index:
        pattern = "({})" if with_brackets else " {} "
        starts = [response.rfind(pattern.format(c)) for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[starts.index(max(starts))]


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list[str | float]:
    """Numbers become floats rounded to 2 decimals; one-letter strings get padded to avoid trivial matches."""
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def extract_numbers(s: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation, and plain (the official three patterns)."""
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", s)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", s)
    return with_commas + scientific + simple


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys: list[str] = []
    for index, resp in enumerate(subs):
        if index == len(subs) - 1:
            indicators.append("=")
        shortest: str | None = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
    """Official open-answer parser: candidate strings and numbers, normalised, de-duplicated."""
    keys = _key_subresponses(response)
    preds: list[str] = list(keys)
    for resp in keys:
        preds.extend(extract_numbers(resp))
    out: list[str | float] = []
    for p in preds:
        out.extend(normalize_str(p))
    return list(dict.fromkeys(out))


def eval_multi_choice(gold: str | list[str], pred: str) -> bool:
    """Exact letter match (any of several golds)."""
    return pred in gold if isinstance(gold, list) else gold == pred


def eval_open(gold: str | list[str], preds: list[str | float]) -> bool:
    """A float prediction must equal a normalised gold; a string prediction must contain a string gold."""
    norm: list[str | float] = []
    for g in gold if isinstance(gold, list) else [gold]:
        norm.extend(normalize_str(g))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(n, str) and n in p for n in norm):
                return True
        elif p in norm:
            return True
    return False
