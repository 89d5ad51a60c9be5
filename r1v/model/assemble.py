"""Build `InternVLForConditionalGeneration` from parts, and swap its LLM (the R1V "re-assembly").

The parts are used as they are (no copy, no re-initialisation): the model is first built on the meta device
and its three children are then replaced, so assembling a 38B model costs no extra memory. Checks name what
does not match.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from r1v.model.tokens import IMG_CONTEXT, REQUIRED_SPECIAL_TOKENS

SPECIAL_IDS_KEY = "r1v_special_token_ids"
"""Config attribute: ids of REQUIRED_SPECIAL_TOKENS the VLM was built with (checked on re-assembly)."""


class ReassemblyError(ValueError):
    """The parts cannot form one model: hidden size, vocabulary or special tokens disagree."""


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of REQUIRED_SPECIAL_TOKENS; ReassemblyError names a token that is absent or not a single id."""
    vocab = tokenizer.get_vocab()
    ids: dict[str, int] = {}
    for token in REQUIRED_SPECIAL_TOKENS:
        if token not in vocab:
            raise ReassemblyError(
                f"tokenizer has no token {token!r}: add it as a single-id token before assembly"
            )
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if encoded != [vocab[token]]:
            raise ReassemblyError(f"tokenizer splits {token!r} into {encoded}: it must be one added token")
        ids[token] = vocab[token]
    return ids


def _projector_dims(projector: nn.Module) -> tuple[int, int]:
    if not isinstance(projector, InternVLMultiModalProjector):
        raise TypeError(f"projector must be an InternVLMultiModalProjector, got {type(projector).__name__}")
    return projector.layer_norm.normalized_shape[0], projector.linear_2.out_features


def _check_vocab(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = llm.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ReassemblyError(
            f"LLM embedding table has {rows} rows but the tokenizer has {len(tokenizer)} tokens: "
            "resize the embeddings or use the LLM's own tokenizer"
        )


def assemble(
    vision_tower: PreTrainedModel,
    projector: nn.Module,
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    vision_config: InternVLVisionConfig,
    downsample_ratio: float = 0.5,
    vision_feature_layer: int = -1,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    meta: bool = False,
) -> InternVLForConditionalGeneration:
    """Join a vision tower, an InternVL projector and a causal LM (`.model` + `lm_head`) into one VLM.

    With `meta`, the parts may live on the meta device (no weights): the checks and the config only, which is
    what `r1v.model.manifest.reassemble_model` writes."""
    in_dim, out_dim = _projector_dims(projector)
    hidden = llm.config.get_text_config().hidden_size
    if out_dim != hidden:
        raise ReassemblyError(f"LLM hidden size {hidden} does not match the projector output {out_dim}")
    expected_in = vision_config.hidden_size * int(1 / downsample_ratio) ** 2
    if in_dim != expected_in:
        raise ReassemblyError(
            f"projector input {in_dim} does not match vision hidden size {vision_config.hidden_size} "
            f"x (1/downsample_ratio {downsample_ratio})^2 = {expected_in}"
        )
    _check_vocab(llm, tokenizer)
    ids = special_token_ids(tokenizer)
    tokens_per_tile = _tokens_per_tile(vision_config, downsample_ratio)
    text_config = llm.config.get_text_config()
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids[IMG_CONTEXT],
        image_seq_length=tokens_per_tile,
        downsample_ratio=downsample_ratio,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        **{SPECIAL_IDS_KEY: ids},
    )
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model.model.vision_tower = vision_tower
    model.model.multi_modal_projector = projector
    model.model.language_model = llm.base_model
    model.lm_head = llm.get_output_embeddings()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover and not meta:
        raise RuntimeError(f"assembly left tensors on the meta device: {leftover[:5]}")
    model.generation_config = copy.deepcopy(llm.generation_config)
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def reassemble(
    vlm: InternVLForConditionalGeneration, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    *, meta: bool = False,
) -> InternVLForConditionalGeneration:
    """Put `vlm`'s vision tower and projector in front of `llm` (the modules are shared, not copied).

    Refuses (ReassemblyError) when the LLM's hidden size is not the projector's output size, its embedding
    table is smaller than the tokenizer, or a required token is missing or has another id than in `vlm`.
    """
    _, out_dim = _projector_dims(vlm.model.multi_modal_projector)
    hidden = llm.config.get_text_config().hidden_size
    if hidden != out_dim:
        raise ReassemblyError(f"LLM hidden size {hidden} does not match the projector output {out_dim}")
    _check_vocab(llm, tokenizer)
    ids = special_token_ids(tokenizer)
    built_with = dict(getattr(vlm.config, SPECIAL_IDS_KEY, None) or {IMG_CONTEXT: vlm.config.image_token_id})
    for token, old in built_with.items():
        if ids.get(token, old) != old:
            raise ReassemblyError(
                f"token {token!r} has id {ids[token]} in the new tokenizer but {old} in the VLM: "
                "prompts tokenised for one would be wrong for the other"
            )
    return assemble(
        vlm.model.vision_tower,
        vlm.model.multi_modal_projector,
        llm,
        tokenizer,
        vision_config=vlm.config.vision_config,
        downsample_ratio=vlm.config.downsample_ratio,
        vision_feature_layer=vlm.config.vision_feature_layer,
        vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
        projector_hidden_act=vlm.config.projector_hidden_act,
        meta=meta,
    )


def _side(value: int | list[int] | tuple[int, ...]) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


def _tokens_per_tile(vision_config: InternVLVisionConfig, downsample_ratio: float) -> int:
    return int((_side(vision_config.image_size) // _side(vision_config.patch_size)) ** 2 * downsample_ratio**2)


def tile_size(model: InternVLForConditionalGeneration | InternVLConfig) -> int:
    """Pixels per tile side the vision tower was built for (a model or just its config)."""
    return _side(getattr(model, "config", model).vision_config.image_size)


def num_image_tokens(model: InternVLForConditionalGeneration | InternVLConfig) -> int:
    """`<IMG_CONTEXT>` tokens per tile: (tile/patch)^2 patches, shuffled by downsample_ratio per side."""
    config = getattr(model, "config", model)
    return _tokens_per_tile(config.vision_config, config.downsample_ratio)


def image_token_id(model: InternVLForConditionalGeneration) -> int:
    """Id of `<IMG_CONTEXT>`, whose positions receive the projected image features."""
    return int(model.config.image_token_id)
