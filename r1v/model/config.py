"""Configs of the model stage kinds: `model.tiny`, `reassemble`, `model.assemble`."""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from r1v.core.config import Strict


class TinySpec(pydantic.BaseModel):
    """Sizes of a tiny VLM; the defaults run forward and generate on a CPU in milliseconds."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = pydantic.Field(64, gt=0)
    num_layers: int = pydantic.Field(2, gt=0)
    num_heads: int = pydantic.Field(4, gt=0)
    num_kv_heads: int = pydantic.Field(2, gt=0)
    intermediate_size: int = pydantic.Field(128, gt=0)
    vocab_size: int = pydantic.Field(
        512, gt=0, description="tokenizer vocabulary; the model uses len(tokenizer)"
    )
    vision_hidden_size: int = pydantic.Field(32, gt=0)
    vision_layers: int = pydantic.Field(1, gt=0)
    vision_heads: int = pydantic.Field(2, gt=0)
    tile_size: int = pydantic.Field(56, gt=0, description="pixels per tile side")
    patch_size: int = pydantic.Field(14, gt=0)
    max_position_embeddings: int = pydantic.Field(2048, gt=0)
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _check_shapes(self) -> TinySpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size {self.vision_hidden_size} is not divisible by "
                f"vision_heads {self.vision_heads}"
            )
        patches = self.tile_size // self.patch_size
        if self.tile_size % self.patch_size or patches % 2:
            raise ValueError(
                f"tile_size {self.tile_size} must be an even multiple of patch_size {self.patch_size} "
                "(pixel shuffle halves the patch grid)"
            )
        return self


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
