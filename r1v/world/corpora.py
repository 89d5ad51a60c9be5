"""The miniature world's corpora for one run: alignment (perception only), SFT (multimodal chains of
thought), GRPO prompts and the held-out test, all rendered from a seed.

Training corpora draw digit tuples from the train split only; the test corpus from the test split only, so no
test combination appears in training (nor in the backbones' pretraining). Test rows carry in `meta` the
problem's level and its text-only form (`text_question`), for the text baselines.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from r1v.data.schema import make_row, write_corpus
from r1v.world.domain import (
    Problem,
    digits_text,
    direct_answer,
    image_question,
    make_problem,
    perception_qa,
    reasoning_answer,
    sample_digits,
    text_question,
)
from r1v.world.render import png_bytes, render_digits


def _meta(p: Problem, split: str) -> dict[str, Any]:
    return {"level": p.level, "digits": digits_text(p.digits), "expr": p.expr, "split": split,
            "text_question": text_question(p)}


def align_rows(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Perception only: questions about what the digits are, answered in the instruct model's direct style.

    (Captions, the grid written out, were tried too: the instruct LLM never saw that task in text, and the
    projector could not learn it through the frozen LLM: loss stuck at 2.4 where these questions reach 0.15.)"""
    rows = []
    for i in range(n):
        d = sample_digits(rng, "train")
        q, a = perception_qa(rng, d)
        rows.append(make_row(f"world-align-{i:06d}", [{"role": "user", "content": f"<image>\n{q}"},
                                                      {"role": "assistant", "content": direct_answer(a)}],
                             [png_bytes(render_digits(d, rng))], answer=a, source="world/align",
                             meta={"digits": digits_text(d), "question": q}))
    return rows


def problem_rows(n: int, rng: random.Random, split: str, with_reasoning: bool, prefix: str,
                 balanced_levels: bool = False) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        p = make_problem(rng, split, level=1 + i % 3 if balanced_levels else None)
        messages = [{"role": "user", "content": image_question(p)}]
        if with_reasoning:
            messages.append({"role": "assistant", "content": reasoning_answer(p)})
        rows.append(make_row(f"world-{prefix}-{i:06d}", messages, [png_bytes(render_digits(p.digits, rng))],
                             answer=str(p.answer), source=f"world/{prefix}", meta=_meta(p, split)))
    return rows


def corrupt(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Truncated image bytes: a broken download that must land in the quarantine, not in training."""
    data = row["images"][0]
    row["images"] = [data[: rng.randint(8, max(9, len(data) // 3))]]
    return row


def generate(out: Path, n_align: int, n_sft: int, n_grpo: int, n_test: int, seed: int,
             corrupt_rows: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    align = align_rows(n_align, rng)
    for i in rng.sample(range(n_align), min(corrupt_rows, n_align)):
        align[i] = corrupt(align[i], rng)
    sft = problem_rows(n_sft, rng, "train", True, "sft")
    grpo = problem_rows(n_grpo, rng, "train", False, "grpo")
    test = problem_rows(n_test, random.Random(10_000 + seed), "test", False, "test", balanced_levels=True)
    return {name: write_corpus(rows, out / name)
            for name, rows in (("align", align), ("sft", sft), ("grpo", grpo), ("test", test))}
