"""Configs of the model stage kinds: `model.tiny`, `reassemble`, `model.assemble`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from r1v.core.config import Strict
from r1v.model.spec import TinySpec


class TinyModelConfig(TinySpec):
    """Tiny random models for tests and the demo: a substitute VLM (built with `seed`) and a second
    "reasoning" LLM of the same shape (built with `reasoning_seed`)."""

    reasoning_seed: int = 1


class ReassembleConfig(Strict):
    model: str = Field(description="VLM whose vision tower and projector are kept")
    llm: str = Field(description="causal LM directory that replaces the VLM's language model")


class AssembleConfig(Strict):
    """A VLM from real parts: a vision tower (and maybe its projector) and a reasoning LLM."""

    vision: str = Field(description="InternVL-chat or HF InternVL checkpoint: its vision tower (and projector)")
    llm: str = Field(description="local HF Qwen2 causal LM directory (the DeepSeek-R1-Distill-Qwen layout)")
    projector: Literal["fresh", "from_vision"] = "fresh"
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
