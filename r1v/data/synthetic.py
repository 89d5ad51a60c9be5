"""A small synthetic visual reasoning task: numbers drawn in an image, an integer answer after one operation.

Why this task: its answer cannot be guessed from the text alone (the numbers are only in the image), it has
a verifiable integer answer for the rule-based rewards, and it renders in milliseconds without any download.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from r1v.data.schema import make_row, write_corpus

QUESTIONS = {
    "sum": ("What is the sum of the numbers in the image?", lambda a, b: a + b, "{a} + {b} = {r}"),
    "difference": ("What is the larger number in the image minus the smaller one?",
                   lambda a, b: abs(a - b), "{hi} - {lo} = {r}"),
    "product": ("What is the product of the numbers in the image?", lambda a, b: a * b, "{a} * {b} = {r}"),
    "max": ("What is the largest number in the image?", lambda a, b: max(a, b), "max({a}, {b}) = {r}"),
}


def render_numbers(values: list[int], width: int, height: int, rng: random.Random) -> bytes:
    """PNG bytes with each value drawn in its own horizontal slot, jittered, on a random light background."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, int(height * 0.5)))
    slot = width // len(values)
    for i, v in enumerate(values):
        x = i * slot + rng.randint(2, max(2, slot // 3))
        y = rng.randint(0, max(0, height // 3))
        fg = tuple(rng.randint(0, 90) for _ in range(3))
        draw.text((x, y), str(v), fill=fg, font=font)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def make_example(i: int, split: str, rng: random.Random, width: int, height: int, max_value: int,
                 ops: list[str]) -> dict[str, Any]:
    a, b = rng.randint(0, max_value), rng.randint(0, max_value)
    op = rng.choice(ops)
    question, fn, step = QUESTIONS[op]
    r = fn(a, b)
    reasoning = f"<think>\nThe numbers are {a} and {b}. " + step.format(a=a, b=b, r=r, hi=max(a, b),
                                                                          lo=min(a, b)) + ".\n</think>\n"
    messages = [
        {"role": "user", "content": f"<image>\n{question}"},
        {"role": "assistant", "content": reasoning + f"Answer: \\boxed{{{r}}}"},
    ]
    image = render_numbers([a, b], width, height, rng)
    return make_row(f"synthetic-{split}-{i:06d}", messages, [image], answer=str(r), source="synthetic",
                    meta={"op": op, "values": [a, b], "split": split})


def corrupt(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Truncate the image bytes: a realistic broken download that must land in the quarantine."""
    data = row["images"][0]
    row["images"] = [data[: rng.randint(8, max(9, len(data) // 3))]]
    row["meta"] = row["meta"][:-1] + ', "corrupted": true}'
    return row


def generate(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, width: int = 112, height: int = 56,
             max_value: int = 9, ops: list[str] | None = None, corrupt_rows: int = 0) -> dict[str, Path]:
    """Write `train` and `test` corpora under out_dir; `corrupt_rows` train rows get truncated images."""
    ops = list(ops or ["sum", "difference", "product"])
    unknown = set(ops) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"unknown synthetic ops {sorted(unknown)}; known: {sorted(QUESTIONS)}")
    out = Path(out_dir)
    rng = random.Random(seed)
    train = [make_example(i, "train", rng, width, height, max_value, ops) for i in range(n_train)]
    for idx in rng.sample(range(n_train), min(corrupt_rows, n_train)):
        train[idx] = corrupt(train[idx], rng)
    test = [make_example(i, "test", rng, width, height, max_value, ops) for i in range(n_test)]
    return {"train": write_corpus(train, out / "train"), "test": write_corpus(test, out / "test")}
