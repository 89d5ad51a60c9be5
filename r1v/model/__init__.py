"""Assembly, re-assembly, freezing, saving and tiny construction of the InternVL-architecture VLM.

Names load lazily (PEP 562): importing a light submodule such as `r1v.model.tokens` or `r1v.model.tiling`
does not pull in torch and transformers' model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "assemble": (
        "ReassemblyError",
        "assemble",
        "image_token_id",
        "num_image_tokens",
        "reassemble",
        "special_token_ids",
        "tile_size",
    ),
    "forward": ("image_features", "multimodal_logits", "vision_features"),
    "freeze": ("GROUPS", "apply_freeze", "param_group_of", "trainable_state_dict"),
    "io": ("load_llm", "load_model", "save_llm", "save_model"),
    "tiling": ("choose_grid", "dynamic_tiles", "image_to_pixel_values", "load_image", "normalize"),
    "tiny": ("TinySpec", "build_tiny_llm", "build_tiny_vlm"),
    "tokenizer": ("build_tiny_tokenizer",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "GROUPS",
    "ReassemblyError",
    "TinySpec",
    "apply_freeze",
    "assemble",
    "build_tiny_llm",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "choose_grid",
    "dynamic_tiles",
    "image_features",
    "image_to_pixel_values",
    "image_token_id",
    "load_image",
    "load_llm",
    "load_model",
    "multimodal_logits",
    "normalize",
    "num_image_tokens",
    "param_group_of",
    "reassemble",
    "save_llm",
    "save_model",
    "special_token_ids",
    "tile_size",
    "trainable_state_dict",
    "vision_features",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'r1v.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"r1v.model.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from r1v.model.assemble import (
        ReassemblyError,
        assemble,
        image_token_id,
        num_image_tokens,
        reassemble,
        special_token_ids,
        tile_size,
    )
    from r1v.model.forward import image_features, multimodal_logits, vision_features
    from r1v.model.freeze import GROUPS, apply_freeze, param_group_of, trainable_state_dict
    from r1v.model.io import load_llm, load_model, save_llm, save_model
    from r1v.model.tiling import choose_grid, dynamic_tiles, image_to_pixel_values, load_image, normalize
    from r1v.model.tiny import TinySpec, build_tiny_llm, build_tiny_vlm
    from r1v.model.tokenizer import build_tiny_tokenizer
