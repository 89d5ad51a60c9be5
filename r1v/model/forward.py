"""The VLM forward pass with a swappable projector.

GRPO's reference policy is the frozen backbones plus the *starting* projector, so the trainer scores
reference log-probs by running the same model with a frozen copy of that projector. Everything goes through
submodule calls (`vision_tower`, `embed_tokens`, `language_model`, `lm_head`), never `.weight`, so
DeepSpeed ZeRO-3's per-module gather hooks fire. The steps equal transformers'
`InternVLModel.get_image_features` and `forward`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import InternVLForConditionalGeneration

from r1v.model.tiling import IMAGENET_MEAN, IMAGENET_STD


def normalize_pixels(pixel_values: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 tiles [n, 3, H, W] -> x/255, then ImageNet mean/std, on the tensor's device (float32 maths, the same
    operations in the same order as torchvision's ToTensor + Normalize, hence bit-identical), cast to `dtype`.
    Float input is taken as already normalised."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values.to(dtype)

    mean = torch.from_numpy(IMAGENET_MEAN).to(pixel_values.device)[:, None, None]
    std = torch.from_numpy(IMAGENET_STD).to(pixel_values.device)[:, None, None]
    return ((pixel_values.to(torch.float32) / 255.0 - mean) / std).to(dtype)


def vision_features(model: InternVLForConditionalGeneration, pixel_values: Tensor) -> Tensor:
    """Pixel-shuffled vision features before the projector, [n_tiles, tokens_per_tile, 4*d_vision].

    They do not depend on the projector, so they can be computed once per prompt and reused (see `features=`).
    """
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one int, got {layer!r}")
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be [n_tiles, 3, H, W], got shape {tuple(pixel_values.shape)}")
    tower = model.model.vision_tower
    pixel_values = normalize_pixels(pixel_values, model.dtype)
    if layer == -1:
        feats = tower(pixel_values=pixel_values).last_hidden_state
    else:
        feats = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
    if config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:, :]
    n_tiles, n_patches, _ = feats.shape
    side = int(n_patches**0.5)
    if side * side != n_patches:
        raise ValueError(f"{n_patches} vision tokens per tile do not form a square grid")
    feats = feats.reshape(n_tiles, side, side, -1)
    feats = model.model.pixel_shuffle(feats, scale_factor=config.downsample_ratio)
    return feats.reshape(n_tiles, -1, feats.shape[-1])


def image_features(
    model: InternVLForConditionalGeneration,
    pixel_values: Tensor | None = None,
    projector: nn.Module | None = None,
    *,
    features: Tensor | None = None,
) -> Tensor:
    """Projected image features, [n_tiles * tokens_per_tile, hidden], through `projector` or the model's own.

    Pass `features` (from `vision_features`) instead of `pixel_values` to skip the vision tower.
    """
    if (pixel_values is None) == (features is None):
        raise ValueError("pass exactly one of pixel_values and features")
    if features is None:
        features = vision_features(model, pixel_values)
    proj = projector if projector is not None else model.model.multi_modal_projector
    out = proj(features)
    return out.reshape(-1, out.shape[-1])


def multimodal_hidden(
    model: InternVLForConditionalGeneration,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    projector: nn.Module | None = None,
    *,
    features: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """The LLM's last hidden states [B, T, H], image features scattered into the `<IMG_CONTEXT>` slots.

    Callers that need only some positions' logits (GRPO: the response tokens) cut these before `lm_head`, so
    no [B, T, V] tensor of the whole batch is built.
    """
    embeds = model.get_input_embeddings()(input_ids)
    mask = input_ids == model.config.image_token_id
    n_slots = int(mask.sum())
    if pixel_values is not None or features is not None:
        feats = image_features(model, pixel_values, projector, features=features).to(embeds.dtype)
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} <IMG_CONTEXT> tokens but the images give {feats.shape[0]} feature "
                f"vectors ({model.config.image_seq_length} per tile): the prompt's tile counts are wrong"
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
    elif n_slots:
        raise ValueError(f"input_ids hold {n_slots} <IMG_CONTEXT> tokens but no pixel_values were given")
    return model.model.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def multimodal_logits(
    model: InternVLForConditionalGeneration,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    projector: nn.Module | None = None,
    *,
    features: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Logits [B, T, V] (`multimodal_hidden`, then lm_head).

    Equals `model(input_ids, attention_mask, pixel_values).logits` when `projector` is None.
    """
    hidden = multimodal_hidden(model, input_ids, attention_mask, pixel_values, projector, features=features,
                               position_ids=position_ids)
    return model.lm_head(hidden)
