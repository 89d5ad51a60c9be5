"""Prompts and SFT labels in the R1V format, for any tokenizer with a chat template.

`<image>` in message text becomes `<img>` + `<IMG_CONTEXT>` x (tiles x tokens per tile) + `</img>`.
The assistant turn opens with `<think>\\n`. That opener belongs to the *prompt*: `build_prompt` appends it
for generation, and in SFT it is masked, so an SFT sample's input ids start with exactly the ids that GRPO
and eval generate from. Assistant contents are normalised to start with `<think>\\n` (prepended when
missing; a bare `<think>` gets its newline). Labels cover each assistant turn's remaining content and the
end-of-turn token (the tokenizer's eos, `<|im_end|>` for Qwen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from r1v.model.tokens import IMAGE_MARKER, IMG_CONTEXT, IMG_END, IMG_START, THINK_START

IGNORE_INDEX = -100
THINK_OPENER = THINK_START + "\n"

Message = dict[str, Any]


def expand_image_markers(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int) -> str:
    """Replace the i-th `<image>` by `<img>` + IMG_CONTEXT x (tiles[i] * tokens_per_tile) + `</img>`."""
    parts = text.split(IMAGE_MARKER)
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(
            f"text has {len(parts) - 1} {IMAGE_MARKER} marker(s) "
            f"but {len(tiles_per_image)} image(s) were given"
        )
    out = [parts[0]]
    for n_tiles, rest in zip(tiles_per_image, parts[1:], strict=True):
        if n_tiles < 1:
            raise ValueError(f"an image must have at least one tile, got {n_tiles}")
        out.append(IMG_START + IMG_CONTEXT * (n_tiles * tokens_per_tile) + IMG_END + rest)
    return "".join(out)


def _think_normalised(content: str) -> str:
    """Assistant content starting with exactly `<think>\\n`."""
    if content.startswith(THINK_START):
        content = content[len(THINK_START) :].removeprefix("\n")
    return THINK_OPENER + content


def _prepare(
    messages: Sequence[Message], tiles_per_image: Sequence[int], tokens_per_tile: int, system: str | None
) -> list[Message]:
    """Check roles, expand image markers across turns in order, normalise assistant openers, add `system`."""
    if len(messages) == 0:  # len(): Ray Data may hand over a numpy array of dicts
        raise ValueError("messages is empty")
    n_markers = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {m['role']!r}")
        if IMG_CONTEXT in m["content"]:
            raise ValueError(
                f"message {i} already contains {IMG_CONTEXT}: use {IMAGE_MARKER} markers instead"
            )
        n_markers += m["content"].count(IMAGE_MARKER)
    if n_markers != len(tiles_per_image):
        raise ValueError(
            f"messages have {n_markers} {IMAGE_MARKER} marker(s) "
            f"but {len(tiles_per_image)} image(s) were given"
        )
    out: list[Message] = []
    if system is not None and messages[0]["role"] != "system":
        out.append({"role": "system", "content": system})
    used = 0
    for m in messages:
        k = m["content"].count(IMAGE_MARKER)
        content = expand_image_markers(m["content"], tiles_per_image[used : used + k], tokens_per_tile)
        used += k
        if m["role"] == "assistant":
            content = _think_normalised(content)
        out.append({"role": m["role"], "content": content})
    return out


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def build_prompt(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    tiles_per_image: Sequence[int],
    tokens_per_tile: int,
    system: str | None = None,
) -> str:
    """Prompt for generation: all turns but a final assistant one, and the assistant opener + `<think>\\n`."""
    if len(messages) and messages[-1].get("role") == "assistant":
        k = messages[-1]["content"].count(IMAGE_MARKER)
        messages = messages[:-1]
        tiles_per_image = tiles_per_image[: len(tiles_per_image) - k]
    prepared = _prepare(messages, tiles_per_image, tokens_per_tile, system)
    text = _render(tokenizer, prepared, generation_prompt=True)
    return text if text.endswith(THINK_OPENER) else text + THINK_OPENER  # R1 templates may open it already


def encode_prompt(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    tiles_per_image: Sequence[int],
    tokens_per_tile: int,
    system: str | None = None,
) -> list[int]:
    """Token ids of `build_prompt` (no extra BOS: chat templates that want one write it themselves)."""
    text = build_prompt(messages, tokenizer, tiles_per_image, tokens_per_tile, system)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_sft(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    tiles_per_image: Sequence[int],
    tokens_per_tile: int,
    max_length: int,
    system: str | None = None,
) -> dict[str, list[int]]:
    """input_ids and labels for SFT; labels are -100 except assistant content after `<think>\\n` and its eos.

    Raises ValueError when there is no assistant turn or the sample is longer than `max_length` tokens.
    """
    prepared = _prepare(messages, tiles_per_image, tokens_per_tile, system)
    if not any(m["role"] == "assistant" for m in prepared):
        raise ValueError("messages have no assistant turn: nothing to train on")
    text = _render(tokenizer, prepared, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(prepared):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, prepared[:i], generation_prompt=True)
        start = len(prefix)
        if not text.startswith(prefix) or not text.startswith(m["content"], start):
            raise ValueError(
                f"the chat template does not render assistant turn {i} after its prefix: cannot place labels"
            )
        end = start + len(m["content"])
        eos = tokenizer.eos_token
        if eos and text.startswith(eos, end):
            end += len(eos)
        spans.append((start + len(THINK_OPENER), end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = enc["input_ids"]
    if len(input_ids) > max_length:
        raise ValueError(f"sample has {len(input_ids)} tokens, more than max_length {max_length}")
    labels = [
        tok if any(lo <= s < hi for lo, hi in spans) and e > s else IGNORE_INDEX
        for tok, (s, e) in zip(input_ids, enc["offset_mapping"], strict=True)
    ]
    return {"input_ids": input_ids, "labels": labels}
