"""Benchmark items -> chat prompts in the form the paper evaluates with (METHOD.md section 5).

Text benchmarks (MATH-500, AIME) use the DeepSeek-R1 instruction, so that a distilled reasoning model sees the
prompt it was tuned on.  Vision benchmarks (MathVista, MMMU, MATH-Vision) append the R1V answer-format suffix:
the last line must be ``Answer: \\boxed{...}`` (a letter for multiple choice), which is what the graders'
boxed-answer extraction reads, plus the requests for a reasoned guess and no endless repetition that keep
long generations from running out of tokens without an answer.

Images: the model sees one ``<image>`` marker per image, all in front of the question.  The benchmarks' own
placeholders (MMMU ``<image 1>``, MATH-Vision ``<image1>``) stay in the text, since the question refers to
them by name; they are not markers, so they do not change the marker count that preprocessing checks.
"""

from __future__ import annotations

from typing import Any

from r1v.eval.items import BenchItem
from r1v.model.tokens import IMAGE_MARKER

TEXT_BENCHMARKS = frozenset({"math500", "aime24", "aime25"})
VISION_BENCHMARKS = frozenset({"mathvista", "mmmu", "mathv", "mathv-testmini"})

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_GUESS_AND_NO_REPEAT = (
    "If you are not sure or the problem is too hard, give your best reasoned guess from the information "
    "you have. Do not repeat the same steps over and over: commit to an answer even when uncertain. "
    "Reason step by step and take all the relevant information into account before you answer."
)
MULTI_CHOICE_SUFFIX = (
    "Answer the multiple-choice question above. The last line of your response must have this form: "
    "'Answer: \\boxed{$LETTER}' (without quotes), where LETTER is the letter of one of the options. "
    + _GUESS_AND_NO_REPEAT
)
FREE_FORM_SUFFIX = (
    "Answer the question above. The last line of your response must have this form: "
    "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where FINAL_ANSWER is the conclusion of your "
    "reasoning. " + _GUESS_AND_NO_REPEAT
)


def option_letters(n: int) -> list[str]:
    """``A``, ``B``, ... for ``n`` options; the graders map letters back to options in this order."""
    if n > 26:
        raise ValueError(f"{n} options cannot be lettered A-Z")
    return [chr(ord("A") + i) for i in range(n)]


def is_multiple_choice(benchmark: str, item: BenchItem) -> bool:
    """Whether the item is answered with an option letter.

    MMMU lists options for some open questions' metadata too, so its own ``question_type`` decides; elsewhere
    an item is multiple choice exactly when it has options.
    """
    if benchmark == "mmmu" and item.meta.get("question_type"):
        return item.meta["question_type"] == "multiple-choice" and bool(item.choices)
    return bool(item.choices)


def _no_markers(text: str) -> str:
    """Neutralise a literal ``<image>`` in benchmark text: preprocessing would count it as an image slot."""
    return text.replace(IMAGE_MARKER, "<image >")


def text_prompt(benchmark: str, item: BenchItem) -> str:
    """DeepSeek-R1 style: the problem, then the step-by-step / boxed instruction (once)."""
    if benchmark == "aime25" and item.query:  # AIME 2025's prompt already ends with the instruction
        return _no_markers(item.query)
    question = _no_markers(item.question).rstrip()
    if question.endswith(R1_INSTRUCTION):
        return question
    return f"{question}\n{R1_INSTRUCTION}"


def vision_prompt(benchmark: str, item: BenchItem) -> str:
    """Markers (one per image), the question, lettered options for multiple choice, the R1V suffix."""
    n_images = len(item.images or [])
    parts = [IMAGE_MARKER * n_images] if n_images else []
    body = _no_markers(item.question).strip()
    if is_multiple_choice(benchmark, item):
        choices = list(item.choices or [])
        letters = option_letters(len(choices))
        lines = [f"{letter}. {_no_markers(str(c))}" for letter, c in zip(letters, choices, strict=True)]
        body += "\nOptions:\n" + "\n".join(lines)
        suffix = MULTI_CHOICE_SUFFIX
    else:
        suffix = FREE_FORM_SUFFIX
    parts.append(f"{body}\n{suffix}")
    return "\n".join(parts)


def item_to_messages(benchmark: str, item: BenchItem) -> list[dict[str, str]]:
    """The chat turns for one item: a single user turn (the system prompt, if any, comes from preprocess)."""
    if benchmark in TEXT_BENCHMARKS:
        content = text_prompt(benchmark, item)
    elif benchmark in VISION_BENCHMARKS:
        content = vision_prompt(benchmark, item)
    else:
        known = ", ".join(sorted(TEXT_BENCHMARKS | VISION_BENCHMARKS))
        raise ValueError(f"no prompt format for benchmark {benchmark!r}; known: {known}")
    return [{"role": "user", "content": content}]


def item_to_row(benchmark: str, item: BenchItem) -> dict[str, Any]:
    """A corpus-style row (``id, images, messages, answer, source``) that ``preprocess_row`` accepts."""
    return {
        "id": item.id,
        "images": list(item.images or []),
        "messages": item_to_messages(benchmark, item),
        "answer": None if item.answer is None else str(item.answer),
        "source": benchmark,
    }
