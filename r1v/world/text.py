"""Text corpora of the miniature world: the base LM's pretraining documents and the two children's chats.

The base model reads documents that present four digits under varied headers and work with them (lookups,
arithmetic facts, worked and unworked problems). The children are fine-tuned from it on chats:
- instruct: answers directly (an empty think block, then `Answer: \\boxed{..}`), like a non-reasoning model;
- reasoning: thinks in `<think>` (reads the letters it needs, one line per operation) before `\\boxed{}`; with
  an `OverthinkConfig`, some chains also restate segments they have written (`domain.overthought_chain`).
Every text uses training-split digit tuples only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from r1v.world.config import OverthinkConfig
from r1v.world.domain import (
    LETTERS,
    Problem,
    direct_answer,
    draw_checks,
    grid_text,
    labelled_digits,
    make_problem,
    overthought_answer,
    perception_qa,
    reasoning_answer,
    sample_digits,
    text_question,
)

HEADERS = ("Grid:", "Board:", "Cells", "Read:", "Tile", "Values:", "Card", "Panel:")


def _assign(digits: tuple[int, ...]) -> str:
    return ", ".join(f"{k} = {d}" for k, d in zip(LETTERS, digits, strict=True))


def base_document(rng: random.Random) -> str:
    """One pretraining document; its kind is drawn at random."""
    r = rng.random()
    if r < 0.25:  # arithmetic facts
        facts = []
        for _ in range(rng.randint(3, 6)):
            a, b = rng.randrange(10), rng.randrange(10)
            if rng.random() < 0.5:
                facts.append(f"{a} * {b} = {a * b}.")
            else:
                x, y = rng.randrange(100), rng.randrange(100)
                facts.append(f"{x} + {y} = {x + y}." if rng.random() < 0.6 else f"{x} - {y} = {x - y}.")
        return " ".join(facts)
    p = make_problem(rng, "train")
    # half the documents frame the grid as the VLM's prompts do (`<img>A7B7C6D3</img>`), half under a header
    head = grid_text(p.digits) if rng.random() < 0.5 else f"{rng.choice(HEADERS)} {labelled_digits(p.digits)}"
    if r < 0.45:  # the digits, then what some letters are, in a random order: a lookup, not a copy
        ks = rng.sample(range(4), rng.randint(1, 4))
        return f"{head}. " + ", ".join(f"{LETTERS[k]} = {p.digits[k]}" for k in ks) + "."
    if r < 0.55:  # perception questions answered
        parts = [head + "."]
        for _ in range(rng.randint(1, 3)):
            q, a = perception_qa(rng, p.digits)
            parts.append(f"{q} {a}.")
        return " ".join(parts)
    if r < 0.88:  # worked problems
        return f"{head}\n{p.question()}\n{p.chain()} So the answer is {p.answer}."
    return f"{head}\n{p.question()} The answer is {p.answer}."  # unworked problems


def instruct_chat(rng: random.Random, p_perception: float = 0.3) -> list[dict[str, str]]:
    """A text chat in the instruct child's style: perception or arithmetic questions, answered directly."""
    p = make_problem(rng, "train")
    if rng.random() < p_perception:
        q, a = perception_qa(rng, p.digits)
        return [{"role": "user", "content": f"{grid_text(p.digits)}\n{q}"},
                {"role": "assistant", "content": direct_answer(a)}]
    return [{"role": "user", "content": text_question(p)},
            {"role": "assistant", "content": direct_answer(p.answer)}]


def reasoning_chat(rng: random.Random, p_perception: float = 0.1,
                   overthink: OverthinkConfig | None = None) -> list[dict[str, str]]:
    """A text chat in the reasoning child's style: a chain of thought before the boxed answer; with `overthink`,
    the problems' chains carry redundant checks (perception chats stay as they are: nothing to check)."""
    p = make_problem(rng, "train")
    if rng.random() < p_perception:
        q, a = perception_qa(rng, p.digits)
        return [{"role": "user", "content": f"{grid_text(p.digits)}\n{q}"},
                {"role": "assistant", "content": f"<think>\n{_assign(p.digits)}.\n</think>\nAnswer: \\boxed{{{a}}}"}]
    # without the option nothing more is drawn from `rng`: the default build's chats are what they were
    answer = reasoning_answer(p) if overthink is None else overthought_answer(p, draw_checks(p, rng, overthink))
    return [{"role": "user", "content": text_question(p)}, {"role": "assistant", "content": answer}]


def text_test_problems(n: int, seed: int) -> list[Problem]:
    """Held-out problems (test-split digit tuples), levels balanced."""
    rng = random.Random(seed)
    return [make_problem(rng, "test", level=1 + i % 3) for i in range(n)]


def tokenizer_texts(seed: int = 0, n: int = 3000) -> Iterator[str]:
    """Texts the world's tokenizer is trained on (documents and chat contents)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield base_document(rng)
    for _ in range(n // 3):
        for m in instruct_chat(rng) + reasoning_chat(rng):
            yield m["content"]
    yield grid_text(sample_digits(rng, 'train'))
