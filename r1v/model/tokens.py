"""Token strings shared by the tokenizer, the prompt builder and model (re-)assembly.

One place for them so that data, model and rewards cannot disagree on a spelling.
"""

from __future__ import annotations

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
THINK_START = "<think>"
THINK_END = "</think>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

IMAGE_MARKER = "<image>"
"""Placeholder in message text where an image goes; expanded by `r1v.data.prompt`."""

REQUIRED_SPECIAL_TOKENS: tuple[str, ...] = (IMG_START, IMG_END, IMG_CONTEXT, THINK_START, THINK_END)
"""Tokens a reasoning LLM's tokenizer must hold as single ids, with the ids the VLM was built with."""
