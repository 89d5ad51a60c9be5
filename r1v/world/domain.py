"""The miniature world's domain: four digits A, B, C, D and arithmetic over them, in text and in images.

Why this domain: a tiny transformer reads four digits easily but computes a multi-step expression far better
step by step than in one go, so a chain of thought has something to add (the "reasoning ability" the recipe
transfers), and every answer is an integer a rule can check.

A problem is a digit tuple (A, B, C, D) plus an expression over some of the letters. Difficulty level = number
of operations (1..3). The train/test split is a fixed function of the digit tuple (never of a seed): the test
tuples never appear in any training text or image, including the backbones' pretraining.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from r1v.model.tokens import IMG_END, IMG_START

if TYPE_CHECKING:
    from r1v.world.config import OverthinkConfig

LETTERS = ("A", "B", "C", "D")
TEST_FRACTION_PERMILLE = 200  # 20% of the 10,000 digit tuples are held out

# Expression templates by level; x, y, z, w are distinct letters. Multiplication only ever joins two
# single digits, so every step is a fact a tiny model can learn.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("{x} + {y}", "{x} * {y}"),
    2: ("{x} * {y} + {z}", "{x} + {y} + {z}", "{x} * {y} - {z}"),
    3: ("{x} * {y} + {z} * {w}", "{x} + {y} + {z} + {w}", "{x} * {y} - {z} * {w}"),
}
THINK_END = "</think>"
CHECK = "Check:"  # opens a redundant restatement in an overthought chain (`overthought_chain`)


def split_of(digits: tuple[int, ...]) -> str:
    """'test' or 'train', a fixed hash of the tuple: the same split for every seed and every build."""
    h = int(hashlib.sha256("".join(map(str, digits)).encode()).hexdigest()[:8], 16) % 1000
    return "test" if h < TEST_FRACTION_PERMILLE else "train"


def sample_digits(rng: random.Random, split: str) -> tuple[int, int, int, int]:
    while True:
        d = tuple(rng.randrange(10) for _ in range(4))
        if split_of(d) == split:
            return d  # type: ignore[return-value]


@dataclass(frozen=True)
class Problem:
    digits: tuple[int, int, int, int]
    expr: str  # e.g. "A * C + D"
    level: int

    @property
    def values(self) -> dict[str, int]:
        return dict(zip(LETTERS, self.digits, strict=True))

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) in evaluation order: products first, then left to right."""
        toks = self.expr.split()
        vals: list[int | str] = [self.values[t] if t in LETTERS else t for t in toks]
        out: list[tuple[int, str, int, int]] = []
        i = 1
        while i < len(vals):  # products
            if vals[i] == "*":
                a, b = int(vals[i - 1]), int(vals[i + 1])
                out.append((a, "*", b, a * b))
                vals[i - 1 : i + 2] = [a * b]
            else:
                i += 2
        acc = int(vals[0])
        for j in range(1, len(vals), 2):
            op, b = str(vals[j]), int(vals[j + 1])
            r = acc + b if op == "+" else acc - b
            out.append((acc, op, b, r))
            acc = r
        return out

    @property
    def answer(self) -> int:
        s = self.steps()
        return s[-1][3]

    def used_letters(self) -> list[str]:
        seen: list[str] = []
        for t in self.expr.split():
            if t in LETTERS and t not in seen:
                seen.append(t)
        return seen

    def question(self) -> str:
        return f"Compute {self.expr}."

    def segments(self) -> list[str]:
        """The chain's segments: the reads (`A = 3, C = 5.`), then one per operation (`3 * 5 = 15.`)."""
        reads = ", ".join(f"{k} = {self.values[k]}" for k in self.used_letters())
        return [f"{reads}.", *(f"{a} {op} {b} = {r}." for a, op, b, r in self.steps())]

    def chain(self, checks: Sequence[int] | None = None) -> str:
        """The reasoning: read the letters it needs, then one line per operation. With `checks` (one count per
        segment), segment i is followed by `checks[i]` restatements `Check: <segment i>` (see `overthought_chain`)."""
        segs = self.segments()
        if checks is None:
            return " ".join(segs)
        if len(checks) != len(segs):
            raise ValueError(f"{len(checks)} check counts for a chain of {len(segs)} segments")
        return " ".join(part for seg, k in zip(segs, checks, strict=True) for part in [seg] + [f"{CHECK} {seg}"] * k)


def make_problem(rng: random.Random, split: str, level: int | None = None) -> Problem:
    level = level or rng.choice((1, 2, 3))
    template = rng.choice(TEMPLATES[level])
    names = rng.sample(LETTERS, 4)
    expr = template.format(x=names[0], y=names[1], z=names[2], w=names[3])
    return Problem(sample_digits(rng, split), expr, level)


def digits_text(digits: tuple[int, ...]) -> str:
    return "".join(map(str, digits))


CELL_TOKENS = tuple(f"{k}{d}" for k in LETTERS for d in range(10))
"""`A0` .. `D9`: one token each in the world's tokenizer, so that a letter and its digit travel together, in
text as in an image cell (which becomes one image token)."""


def labelled_digits(digits: tuple[int, ...]) -> str:
    """`A7B7C6D3`: what the image shows, written out (each letter with its digit: four tokens)."""
    return "".join(f"{k}{d}" for k, d in zip(LETTERS, digits, strict=True))


def grid_text(digits: tuple[int, ...]) -> str:
    """`<img>A7B7C6D3</img>`: the grid written out inside the image's own delimiters, token for token where the
    image form has `<img>`, its four image tokens and `</img>`. The LLMs read grids in this frame from
    pretraining on, so a projector that writes the cells' embeddings gives the reasoning LLM its text input
    (with a bare `Grid: ` frame instead, such a perfect projector scored 0.41 against 0.92 on text)."""
    return f"{IMG_START}{labelled_digits(digits)}{IMG_END}"


def text_question(p: Problem) -> str:
    """The text-only form of a problem: the labelled digits written out where the image would be."""
    return f"{grid_text(p.digits)}\n{p.question()}"


def image_question(p: Problem) -> str:
    return f"<image>\n{p.question()}"


def reasoning_answer(p: Problem) -> str:
    return f"<think>\n{p.chain()}\n{THINK_END}\nAnswer: \\boxed{{{p.answer}}}"


CLOSING = " So the answer is"
"""How an overthought chain ends, right before `</think>` (no newline). Its tokens in the world's tokenizer
(` So`, ` the`, ` answer`, ` is`) occur in no prompt (the chat template's `<|im_start|>user`, newlines and
`<|im_end|>`, the grid or image tokens, `Compute ...`, `<think>`) and nowhere in the chain before it, and
`</think>` follows them directly; so a repetition penalty over prompt + generated tokens, as HF and vLLM apply
it, never weighs against closing the chain, only against another check. (The plain chain closes with `\n`,
which every prompt contains.) The base LM's worked problems end `... So the answer is N.`, so the phrase is one
it already knows to follow a chain."""


def draw_checks(p: Problem, rng: random.Random, cfg: OverthinkConfig) -> list[int]:
    """Check counts per segment of `p`'s chain: with probability `cfg.share[level]`, between `min_checks` and
    `max_checks` checks, each after a segment drawn uniformly (so a segment may be checked more than once)."""
    counts = [0] * len(p.segments())
    if rng.random() < cfg.share.get(p.level, 0.0):
        for _ in range(rng.randint(cfg.min_checks, cfg.max_checks)):
            counts[rng.randrange(len(counts))] += 1
    return counts


def overthought_chain(p: Problem, checks: Sequence[int]) -> str:
    """The chain with redundant checks, closed by `CLOSING`: `A = 3, B = 5. 3 + 5 = 8. Check: 3 + 5 = 8. So the
    answer is`.

    What is redundant: every check. It restates, word for word, a segment already written (the reads or one
    operation), adds no fact, and the answer follows from the plain chain without it; deleting all checks gives
    `p.chain()` and the same answer. Real reasoning models re-verify steps like this, most on items that need it
    least (hence `OverthinkConfig.share` falls with the level). What a repetition penalty over the sequence sees:
    the first check's content repeats tokens already written (its `Check:` is new, but for ` C` in prompts that
    use C); every later check repeats `Check:` as well, so the penalty weighs more on each further check, while
    the closing is never penalised (`CLOSING`)."""
    return p.chain(checks) + CLOSING


def overthought_answer(p: Problem, checks: Sequence[int]) -> str:
    """`reasoning_answer` with an overthought chain: `<think>` chain `So the answer is</think>` then the box."""
    return f"<think>\n{overthought_chain(p, checks)}{THINK_END}\nAnswer: \\boxed{{{p.answer}}}"


def direct_answer(answer: object) -> str:
    """The instruct model's style: an empty think block, then the answer."""
    return f"<think>\n{THINK_END}\nAnswer: \\boxed{{{answer}}}"


# ----------------------------------------------------------------------------- perception questions

def perception_qa(rng: random.Random, digits: tuple[int, ...]) -> tuple[str, str]:
    """A question about what the digits are (no arithmetic), and its answer."""
    kind = rng.random()
    if kind < 0.3:  # a caption: the grid transcribed, as image-text pairs describe their image
        return "Transcribe the grid.", labelled_digits(digits)
    if kind < 0.5:
        return "List the digits.", digits_text(digits)
    if kind < 0.8:
        k = rng.randrange(4)
        return f"What is {LETTERS[k]}?", str(digits[k])
    d = rng.randrange(10)
    return f"Is there a {d}?", "yes" if d in digits else "no"
