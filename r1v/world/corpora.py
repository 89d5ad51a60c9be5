"""The miniature world's corpora for one run: alignment (perception only), SFT (multimodal chains of
thought), GRPO prompts and the held-out test, all rendered from a seed.

Training corpora draw digit tuples from the train split only; the test corpus from the test split only, so no
test combination appears in training (nor in the backbones' pretraining). Test rows carry in `meta` the
problem's level and its text-only form (`text_question`), for the text baselines.

SFT chains are all correct and well formed unless `sft_noise` asks for flawed ones (`FLAWS`, `add_noise`): the
paper's SFT data comes from teachers and has errors of varying quality, which its reward model grades and its
iterative SFT rounds filter; a corpus with nothing to filter would make those rounds a no-op.

With `clarity`, every image is blurred by a radius drawn per row (`add_clarity`, `meta.blur`), so that image
clarity varies as it does in real corpora and QDAM's image cue has something to measure.

With `overthink`, SFT chains carry the reasoning LLM's overthinking habit (`add_overthinking`): the SFT chains
stand in for the paper's teacher data, which comes from a reasoning model that overthinks, and they are what
AL-CoTD's repetition penalty has to shorten.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from r1v.data.schema import make_row, write_corpus
from r1v.world.config import ClarityConfig, OverthinkConfig
from r1v.world.domain import (
    LETTERS,
    THINK_END,
    Problem,
    digits_text,
    direct_answer,
    draw_checks,
    image_question,
    make_problem,
    overthought_answer,
    perception_qa,
    reasoning_answer,
    sample_digits,
    text_question,
)
from r1v.world.render import blurred, png_bytes, render_digits


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


FLAWS = ("wrong_answer", "no_think_end", "no_box", "overlong", "truncated")
"""Ways a teacher's chain goes wrong, and what the `rule` scorer (defaults: accuracy 3, format 1, length 1 with
max_chars below `OVERLONG_MIN_CHARS`) gives each: a slipped step that carries to a wrong answer (2); no
`</think>` (3: the answer still counts); the answer not boxed (1); the reasoning restated until overlong (4);
the chain cut off before its end, with no answer (0). Clean chains score 5."""
CHECK_REPEATS = 3  # an overlong chain: the chain, then CHECK_REPEATS restatements
CLEAN_MAX_CHARS = 120  # the longest clean reasoning is shorter (tests/world/test_world_noise.py checks it)
OVERLONG_MIN_CHARS = 4 * CLEAN_MAX_CHARS // 3  # and every overlong one is longer: a scorer's max_chars between


def slipped_steps(p: Problem, at: int, delta: int) -> list[tuple[int, str, int, int]]:
    """`p.steps()` with step `at`'s result off by `delta`, and the slip carried into the steps after it."""
    toks = p.expr.split()
    vals: list[int | str] = [p.values[t] if t in LETTERS else t for t in toks]
    out: list[tuple[int, str, int, int]] = []

    def emit(a: int, op: str, b: int, r: int) -> int:
        r += delta if len(out) == at else 0
        out.append((a, op, b, r))
        return r

    i = 1
    while i < len(vals):  # products first, as Problem.steps
        if vals[i] == "*":
            a, b = int(vals[i - 1]), int(vals[i + 1])
            vals[i - 1 : i + 2] = [emit(a, "*", b, a * b)]
        else:
            i += 2
    acc = int(vals[0])
    for j in range(1, len(vals), 2):
        op, b = str(vals[j]), int(vals[j + 1])
        acc = emit(acc, op, b, acc + b if op == "+" else acc - b)
    return out


def flawed_answer(p: Problem, flaw: str, rng: random.Random) -> str:
    """The reasoning answer of `p` with one flaw of `FLAWS`."""
    reads = ", ".join(f"{k} = {p.values[k]}" for k in p.used_letters())
    if flaw == "wrong_answer":
        n = len(p.steps())
        steps = slipped_steps(p, rng.randrange(n), rng.choice((-3, -2, -1, 1, 2, 3)))
        text = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps)
        return f"<think>\n{reads}. {text}\n{THINK_END}\nAnswer: \\boxed{{{steps[-1][3]}}}"
    if flaw == "no_think_end":
        return f"<think>\n{p.chain()}\nAnswer: \\boxed{{{p.answer}}}"
    if flaw == "no_box":
        return f"<think>\n{p.chain()}\n{THINK_END}\nAnswer: {p.answer}"
    if flaw == "overlong":
        chain = p.chain()
        while len(chain) < OVERLONG_MIN_CHARS + 1:  # short chains restated more often
            chain += " Check: " + " ".join([p.chain()] * CHECK_REPEATS)
        return f"<think>\n{chain}\n{THINK_END}\nAnswer: \\boxed{{{p.answer}}}"
    if flaw == "truncated":
        chain = p.chain()
        return f"<think>\n{chain[: rng.randint(len(chain) // 4, 3 * len(chain) // 4)]}"
    raise ValueError(f"unknown flaw {flaw!r}; known: {', '.join(FLAWS)}")


def _problem(meta: dict[str, Any]) -> Problem:
    return Problem(tuple(int(ch) for ch in meta["digits"]), meta["expr"], meta["level"])  # type: ignore[arg-type]


def add_overthinking(rows: list[dict[str, Any]], cfg: OverthinkConfig, seed: int) -> list[dict[str, Any]]:
    """Rewrite every row's chain as an overthought one (`domain.overthought_answer`; checks drawn with `seed`);
    `meta.checks` counts them. Prompts, images and answers are untouched."""
    rng = random.Random(f"overthink-{seed}")
    for row in rows:
        meta = json.loads(row["meta"])
        p = _problem(meta)
        checks = draw_checks(p, rng, cfg)
        row["messages"] = [row["messages"][0], {"role": "assistant", "content": overthought_answer(p, checks)}]
        row["meta"] = json.dumps({**meta, "checks": sum(checks)})
    return rows


def add_noise(rows: list[dict[str, Any]], fractions: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """Replace the reasoning of round(fraction * n) rows per flaw (disjoint rows, drawn with `seed`) by a flawed
    one; `meta.flaw` names it. Other rows, the images and the `answer` column are untouched, so the ground truth
    stays right and only the chains carry the flaws."""
    rng = random.Random(f"sft-noise-{seed}")
    counts = {k: round(f * len(rows)) for k, f in fractions.items() if f > 0}
    if sum(counts.values()) > len(rows):
        raise ValueError(f"sft_noise: {sum(counts.values())} flawed rows asked of {len(rows)}")
    picked = rng.sample(range(len(rows)), sum(counts.values()))
    at = 0
    for flaw in FLAWS:
        for i in picked[at : at + counts.get(flaw, 0)]:
            meta = json.loads(rows[i]["meta"])
            p = _problem(meta)
            rows[i]["messages"] = [rows[i]["messages"][0],
                                   {"role": "assistant", "content": flawed_answer(p, flaw, rng)}]
            meta.pop("checks", None)  # a flawed chain is a plain one: no overthinking's checks
            rows[i]["meta"] = json.dumps({**meta, "flaw": flaw})
        at += counts.get(flaw, 0)
    return rows


def add_clarity(rows: list[dict[str, Any]], cfg: ClarityConfig, seed: int, corpus: str) -> list[dict[str, Any]]:
    """Blur each row's image by a radius drawn from `cfg.blur` (a generator of its own per corpus and seed, so the
    rest of the world's draws are the same with and without clarity); `meta.blur` records the radius."""
    rng = random.Random(f"clarity-{seed}-{corpus}")
    for row in rows:
        radius = rng.choice(cfg.blur)
        if radius > 0:
            row["images"] = [png_bytes(blurred(Image.open(io.BytesIO(b)).convert("RGB"), radius))
                             for b in row["images"]]
        row["meta"] = json.dumps({**json.loads(row["meta"]), "blur": radius})
    return rows


def corrupt(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Truncated image bytes: a broken download that must land in the quarantine, not in training."""
    data = row["images"][0]
    row["images"] = [data[: rng.randint(8, max(9, len(data) // 3))]]
    return row


def generate(out: Path, n_align: int, n_sft: int, n_grpo: int, n_test: int, seed: int,
             corrupt_rows: int = 0, sft_noise: dict[str, float] | None = None,
             overthink: OverthinkConfig | None = None, clarity: ClarityConfig | None = None) -> dict[str, Path]:
    rng = random.Random(seed)
    align = align_rows(n_align, rng)
    if clarity is not None:  # before the corruption: a truncated image stays truncated
        align = add_clarity(align, clarity, seed, "align")
    for i in rng.sample(range(n_align), min(corrupt_rows, n_align)):
        align[i] = corrupt(align[i], rng)
    sft = problem_rows(n_sft, rng, "train", True, "sft")
    if overthink is not None:  # its own generator too; flawed rows (below) replace their chain whole
        sft = add_overthinking(sft, overthink, seed)
    if sft_noise:  # its own generator: the other corpora are the same with and without noise
        sft = add_noise(sft, sft_noise, seed)
    grpo = problem_rows(n_grpo, rng, "train", False, "grpo")
    test = problem_rows(n_test, random.Random(10_000 + seed), "test", False, "test", balanced_levels=True)
    if clarity is not None:
        sft, grpo, test = (add_clarity(rows, clarity, seed, name)
                           for rows, name in ((sft, "sft"), (grpo, "grpo"), (test, "test")))
    return {name: write_corpus(rows, out / name)
            for name, rows in (("align", align), ("sft", sft), ("grpo", grpo), ("test", test))}
