"""Tiny random models with the real architecture (InternViT-style tower, InternVL projector, Qwen2 LLM).

They run the whole recipe on a CPU in seconds: tests and the `tiny` workflow use them instead of hub weights.
"""

from __future__ import annotations

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    InternVLVisionModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from r1v.model.assemble import assemble
from r1v.model.config import TinySpec
from r1v.model.tokenizer import build_tiny_tokenizer
from r1v.model.tokens import PAD

DOWNSAMPLE_RATIO = 0.5


def _seed(spec: TinySpec, seed: int | None) -> int:
    return spec.seed if seed is None else seed


def build_tiny_llm(
    spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int | None = None
) -> Qwen2ForCausalLM:
    """A random Qwen2 causal LM with vocabulary len(tokenizer); the same seed gives the same weights."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(spec, seed))
        model = Qwen2ForCausalLM(config)
    return model.eval()


def tiny_vision_config(spec: TinySpec) -> InternVLVisionConfig:
    """InternViT-style tower config at tiny size: last-layer features, CLS token, no final norm."""
    return InternVLVisionConfig(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=4 * spec.vision_hidden_size,
        image_size=spec.tile_size,
        patch_size=spec.patch_size,
    )


def build_tiny_vlm(
    spec: TinySpec | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    llm: Qwen2ForCausalLM | None = None,
    seed: int | None = None,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerFast]:
    """A random tiny VLM (vision tower + projector + `llm` or a new tiny Qwen2) and its tokenizer."""
    spec = spec or TinySpec()
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer(vocab_size=spec.vocab_size)
    llm = llm if llm is not None else build_tiny_llm(spec, tokenizer, seed)
    vision_config = tiny_vision_config(spec)
    projector_config = InternVLConfig(
        vision_config=vision_config, text_config=llm.config, downsample_ratio=DOWNSAMPLE_RATIO
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(spec, seed) + 1)
        vision_tower = InternVLVisionModel(vision_config)
        projector = InternVLMultiModalProjector(projector_config)
    model = assemble(
        vision_tower,
        projector,
        llm,
        tokenizer,
        vision_config=vision_config,
        downsample_ratio=DOWNSAMPLE_RATIO,
    )
    return model.eval(), tokenizer
