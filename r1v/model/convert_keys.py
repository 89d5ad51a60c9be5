"""Tensor names and config fields of the two checkpoint layouts, mapped both ways (pure functions, no file I/O).

HF layout (transformers' `InternVLForConditionalGeneration`, as `save_pretrained` writes it):
`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`; the
in-memory spellings `model.vision_tower.*`, `model.language_model.*`, `lm_head.*` are accepted as input too.

InternVL-chat layout (the released InternVL and Skywork-R1V weights, read by vLLM's `InternVLChatModel` and
`SkyworkR1VChatModel`): `vision_model.*` (fused `attn.qkv`, layer scales `ls1`/`ls2`), `mlp1.{0,1,3}.*`
(LayerNorm, Linear, GELU, Linear) and the same `language_model.*` as the HF layout.

Config fields without a counterpart travel in a stash so that a round trip restores them: `r1v_internvl_chat`
in an HF config, `r1v_hf` in an InternVL-chat config (both loaders keep unknown fields as attributes).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

CHAT_STASH = "r1v_internvl_chat"
HF_STASH = "r1v_hf"
VARIANTS = {"internvl": "InternVLChatModel", "skywork": "SkyworkR1VChatModel"}
"""`architectures` of each flavour; vLLM picks its model class by this name."""
CHAT_ARCHITECTURES = set(VARIANTS.values())
CHAT_MODEL_TYPES = {"internvl_chat", "skywork_chat"}
"""Both flavours are written with model_type `internvl_chat`, the released InternVL checkpoints' type (vLLM 0.32
has no config class for it: `vllm serve` reads the checkpoint's remote config code, see docs/serving.md); a stashed
`skywork_chat` (as the released weights, whose remote code the conversion copies along) is kept."""
HF_ARCHITECTURE = "InternVLForConditionalGeneration"


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the tensor or config field."""


# ----------------------------------------------------------------------------------------------- tensor names

_SLOTS = {"i": r"\d+", "p": r"weight|bias", "n": r"q_norm|k_norm", "f": r"fc1|fc2", "rest": r".+"}

# (HF name, InternVL-chat name); {slot}s match the patterns above and carry over.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("vision_tower.encoder.layer.{i}.attention.projection_layer.{p}", "vision_model.encoder.layers.{i}.attn.proj.{p}"),
    ("vision_tower.encoder.layer.{i}.attention.{n}.weight", "vision_model.encoder.layers.{i}.attn.{n}.weight"),
    ("vision_tower.encoder.layer.{i}.lambda_1", "vision_model.encoder.layers.{i}.ls1"),
    ("vision_tower.encoder.layer.{i}.lambda_2", "vision_model.encoder.layers.{i}.ls2"),
    ("vision_tower.encoder.layer.{i}.layernorm_before.{p}", "vision_model.encoder.layers.{i}.norm1.{p}"),
    ("vision_tower.encoder.layer.{i}.layernorm_after.{p}", "vision_model.encoder.layers.{i}.norm2.{p}"),
    ("vision_tower.encoder.layer.{i}.mlp.{f}.{p}", "vision_model.encoder.layers.{i}.mlp.{f}.{p}"),
    ("multi_modal_projector.layer_norm.{p}", "mlp1.0.{p}"),
    ("multi_modal_projector.linear_1.{p}", "mlp1.1.{p}"),
    ("multi_modal_projector.linear_2.{p}", "mlp1.3.{p}"),
    ("language_model.{rest}", "language_model.{rest}"),
)
_HF_QKV = "vision_tower.encoder.layer.{i}.attention.{part}_proj.{p}"
_CHAT_QKV = "vision_model.encoder.layers.{i}.attn.qkv.{p}"
_QKV_PARTS = ("q", "k", "v")


def _regex(template: str) -> re.Pattern[str]:
    out = re.escape(template)
    for slot, pattern in {**_SLOTS, "part": "q|k|v"}.items():
        out = out.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{pattern})")
    return re.compile(out)


_TO_CHAT = [(_regex(hf), chat) for hf, chat in _PAIRS]
_TO_HF = [(_regex(chat), hf) for hf, chat in _PAIRS]
_HF_QKV_RE, _CHAT_QKV_RE = _regex(_HF_QKV), _regex(_CHAT_QKV)

_HF_IN_MEMORY = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def hf_disk_key(key: str) -> str:
    """An HF tensor name as `save_pretrained` writes it (in-memory names such as `model.vision_tower.x` mapped)."""
    for prefix, disk in _HF_IN_MEMORY:
        if key.startswith(prefix):
            return disk + key[len(prefix) :]
    return key


@dataclass(frozen=True)
class Entry:
    """One destination tensor: `copy` srcs[0], `cat` the srcs on dim 0, or take third `q`/`k`/`v` of srcs[0]."""

    dst: str
    srcs: tuple[str, ...]
    op: str = "copy"


def _unique(entries: list[Entry]) -> list[Entry]:
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.dst in seen:
            raise ConversionError(f"tensors {seen[e.dst].srcs} and {e.srcs} both map to {e.dst!r}")
        seen[e.dst] = e
    return entries


def plan_to_chat(hf_keys: list[str]) -> list[Entry]:
    """Destination tensors of the InternVL-chat layout from HF tensor names; ConversionError names a key that
    has no place there (never dropped) or a q/k/v projection whose partners are missing."""
    entries: list[Entry] = []
    fused: dict[tuple[str, str], dict[str, str]] = {}
    for key in hf_keys:
        disk = hf_disk_key(key)
        if m := _HF_QKV_RE.fullmatch(disk):
            fused.setdefault((m["i"], m["p"]), {})[m["part"]] = key
            continue
        for pattern, target in _TO_CHAT:
            if m := pattern.fullmatch(disk):
                entries.append(Entry(target.format(**m.groupdict()), (key,)))
                break
        else:
            raise ConversionError(
                f"HF tensor {key!r} has no place in the InternVL-chat layout (InternViT has no final layer norm, "
                "mask token or other extras; the vision config must use mean pooling and absolute positions)"
            )
    for (i, p), parts in fused.items():
        missing = [_HF_QKV.format(i=i, part=x, p=p) for x in _QKV_PARTS if x not in parts]
        if missing:
            raise ConversionError(
                f"cannot fuse {_CHAT_QKV.format(i=i, p=p)!r}: {missing} missing, have {sorted(parts.values())}"
            )
        entries.append(Entry(_CHAT_QKV.format(i=i, p=p), tuple(parts[x] for x in _QKV_PARTS), "cat"))
    return _unique(entries)


def plan_to_hf(chat_keys: list[str]) -> list[Entry]:
    """Destination tensors of the HF layout (as written on disk) from InternVL-chat tensor names."""
    entries: list[Entry] = []
    for key in chat_keys:
        if m := _CHAT_QKV_RE.fullmatch(key):
            entries += [Entry(_HF_QKV.format(i=m["i"], part=x, p=m["p"]), (key,), x) for x in _QKV_PARTS]
            continue
        for pattern, target in _TO_HF:
            if m := pattern.fullmatch(key):
                entries.append(Entry(target.format(**m.groupdict()), (key,)))
                break
        else:
            raise ConversionError(
                f"InternVL-chat tensor {key!r} has no place in the HF InternVL layout "
                "(expected vision_model.*, mlp1.{0,1,3}.* or language_model.*)"
            )
    return _unique(entries)


# ---------------------------------------------------------------------------------------------- config fields

_VISION_SAME = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "num_channels",
    "layer_norm_eps",
    "norm_type",
    "initializer_range",
    "attention_dropout",
)
_VISION_RENAMED = (
    ("qkv_bias", "attention_bias"),
    ("qk_normalization", "use_qk_norm"),
    ("dropout", "hidden_dropout_prob"),
    ("initializer_factor", "layer_scale_init_value"),
)
_VISION_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
)
_HF_VISION_FIXED = {"use_mean_pooling": True, "use_absolute_position_embeddings": True, "use_mask_token": False}
_INTERNVIT_DEFAULTS = {
    "qkv_bias": False,
    "qk_normalization": False,
    "norm_type": "layer_norm",
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "num_channels": 3,
}
_CHAT_VISION_DEFAULTS = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "drop_path_rate": 0.0}
_SHARED_TOP = ("downsample_ratio", "dtype", "torch_dtype", "tie_word_embeddings")
_HF_FIXED = {"vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"}


def _side(value: Any, field: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConversionError(f"vision_config.{field} {list(value)} is not square: InternViT takes one size")
        value = value[0]
    return int(value)


def _tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def _require(config: dict[str, Any], field: str, where: str) -> Any:
    if field not in config:
        raise ConversionError(f"{where} has no field {field!r}")
    return config[field]


def _vision_to_hf(chat_vision: dict[str, Any], stash: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF vision config, chat-only vision fields to stash)."""
    v = {**_INTERNVIT_DEFAULTS, **chat_vision}
    for field in _VISION_REQUIRED:
        _require(v, field, "vision_config")
    hf: dict[str, Any] = {
        "model_type": "internvl_vision",
        **_HF_VISION_FIXED,
        "projection_dropout": v.get("attention_dropout", 0.0),
        **stash,
    }
    hf.update({k: v[k] for k in _VISION_SAME if k in v})
    hf.update({h: v[c] for c, h in _VISION_RENAMED if c in v})
    hf["image_size"] = [_side(v["image_size"], "image_size")] * 2
    hf["patch_size"] = [_side(v["patch_size"], "patch_size")] * 2
    known = {*_VISION_SAME, *(c for c, _ in _VISION_RENAMED), "image_size", "patch_size"}
    return hf, {k: val for k, val in chat_vision.items() if k not in known}


def _vision_to_chat(hf_vision: dict[str, Any], stash: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(InternVL-chat vision config, HF-only vision fields to stash); refuses HF features InternViT lacks."""
    for field in _VISION_REQUIRED:
        _require(hf_vision, field, "vision_config")
    for field, value in _HF_VISION_FIXED.items():
        if hf_vision.get(field, value) != value:
            raise ConversionError(
                f"vision_config.{field} is {hf_vision[field]!r}; the InternVL-chat layout (InternViT) needs {value!r}"
            )
    from transformers import InternVLVisionConfig

    defaults = InternVLVisionConfig()  # fields a config.json may leave out take transformers' defaults
    full = {h: getattr(defaults, h) for h in (*_VISION_SAME, *(h for _, h in _VISION_RENAMED))} | hf_vision
    chat: dict[str, Any] = {**(stash or _CHAT_VISION_DEFAULTS)}
    chat.update({k: full[k] for k in _VISION_SAME})
    chat.update({c: full[h] for c, h in _VISION_RENAMED})
    chat["image_size"] = _side(hf_vision["image_size"], "image_size")
    chat["patch_size"] = _side(hf_vision["patch_size"], "patch_size")
    known = {*_VISION_SAME, *(h for _, h in _VISION_RENAMED), "image_size", "patch_size"}
    return chat, {k: val for k, val in hf_vision.items() if k not in known}


def causal_lm_architecture(llm_config: dict[str, Any]) -> str:
    """The `XForCausalLM` class name of a text config (its `architectures`, else transformers' mapping)."""
    archs = llm_config.get("architectures") or []
    if archs:
        return archs[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = _require(llm_config, "model_type", "text_config")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConversionError(f"text_config.model_type {model_type!r} has no causal-LM class in transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def chat_config_to_hf(chat: dict[str, Any], image_token_id: int | None = None) -> dict[str, Any]:
    """InternVL-chat / Skywork-R1V config.json -> HF InternVL config.json (as a dict).

    `image_token_id` is the tokenizer's `<IMG_CONTEXT>` id (the chat config does not hold it); it must agree with
    a stashed one. Refuses what transformers' InternVL cannot express: pixel-shuffle `ps_version` v1, a
    `force_image_size` other than the tower's, an LLM transformers does not know (e.g. InternLM2).
    """
    stash = copy.deepcopy(chat.get(HF_STASH) or {})
    llm = dict(_require(chat, "llm_config", "InternVL-chat config"))
    vision = _require(chat, "vision_config", "InternVL-chat config")
    from transformers import CONFIG_MAPPING

    if llm.get("model_type") not in CONFIG_MAPPING:
        raise ConversionError(
            f"llm_config.model_type {llm.get('model_type')!r} is not a transformers model; "
            "only LLMs transformers implements (qwen2, llama, ...) convert"
        )
    if chat.get("ps_version", "v1") != "v2":
        raise ConversionError(
            f"ps_version {chat.get('ps_version', 'v1')!r}: transformers' InternVL implements only the v2 pixel shuffle"
        )
    hf_vision, chat_only_vision = _vision_to_hf(vision, stash.pop("vision_config", {}))
    force = chat.get("force_image_size")
    if force is not None and int(force) != hf_vision["image_size"][0]:
        raise ConversionError(
            f"force_image_size {force} differs from vision_config.image_size "
            f"{hf_vision['image_size'][0]}: the position embeddings would need resizing"
        )
    if stash.pop("llm_architectures_added", False):
        llm.pop("architectures", None)
    dtype_added = stash.pop("torch_dtype_added", False)
    stashed_id = stash.pop("image_token_id", None)
    if image_token_id is not None and stashed_id is not None and image_token_id != stashed_id:
        raise ConversionError(
            f"image_token_id: tokenizer's <IMG_CONTEXT> is {image_token_id}, config says {stashed_id}"
        )
    token_id = image_token_id if image_token_id is not None else stashed_id
    consumed = {"llm_config", "vision_config", "select_layer", HF_STASH, *_SHARED_TOP}
    ratio = chat.get("downsample_ratio", 0.5)
    hf: dict[str, Any] = {
        **stash,
        **_HF_FIXED,
        "architectures": [HF_ARCHITECTURE],
        "model_type": "internvl",
        "text_config": llm,
        "vision_config": hf_vision,
        "vision_feature_layer": int(chat.get("select_layer", -1)),
        "downsample_ratio": ratio,
        "image_seq_length": _tokens_per_tile(hf_vision["image_size"][0], hf_vision["patch_size"][0], ratio),
        "tie_word_embeddings": bool(chat.get("tie_word_embeddings", llm.get("tie_word_embeddings", False))),
        CHAT_STASH: {k: v for k, v in chat.items() if k not in consumed} | {"vision_config": chat_only_vision},
    }
    hf.update({k: chat[k] for k in ("dtype", "torch_dtype") if k in chat})
    if dtype_added:
        hf.pop("torch_dtype", None)
    if token_id is not None:
        hf["image_token_id"] = int(token_id)
    return hf


def hf_config_to_chat(hf: dict[str, Any], variant: str | None = None, template: str | None = None) -> dict[str, Any]:
    """HF InternVL config.json -> InternVL-chat config.json (`variant` "internvl" or "skywork" picks
    `architectures`; default: the stashed one, else "internvl")."""
    stash = copy.deepcopy(hf.get(CHAT_STASH) or {})
    for field, value in _HF_FIXED.items():
        if hf.get(field, value) != value:
            raise ConversionError(f"{field} is {hf[field]!r}; the InternVL-chat layout needs {value!r}")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer {layer!r}: the InternVL-chat layout takes one layer")
    text = dict(_require(hf, "text_config", "HF InternVL config"))
    chat_vision, hf_only_vision = _vision_to_chat(
        _require(hf, "vision_config", "HF InternVL config"), stash.pop("vision_config", {})
    )
    hf_only: dict[str, Any] = {"vision_config": hf_only_vision}
    if not text.get("architectures"):
        text["architectures"] = [causal_lm_architecture(text)]
        hf_only["llm_architectures_added"] = True
    consumed = {
        "architectures",
        "model_type",
        "text_config",
        "vision_config",
        "vision_feature_layer",
        CHAT_STASH,
        *_SHARED_TOP,
    }
    hf_only.update({k: v for k, v in hf.items() if k not in consumed})
    if variant is None:
        arch = (stash.get("architectures") or [VARIANTS["internvl"]])[0]
        variant = next((name for name, a in VARIANTS.items() if a == arch), "internvl")
    if variant not in VARIANTS:
        raise ConversionError(f"variant {variant!r}: choose one of {sorted(VARIANTS)}")
    same = (stash.get("architectures") or [None])[0] == VARIANTS[variant]
    model_type = stash.get("model_type", "internvl_chat") if same else "internvl_chat"
    chat: dict[str, Any] = {
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "ps_version": "v2",
        "force_image_size": chat_vision["image_size"],
        **stash,
        "architectures": [VARIANTS[variant]],
        "model_type": model_type,
        "llm_config": text,
        "vision_config": chat_vision,
        "select_layer": layer,
        "downsample_ratio": hf.get("downsample_ratio", 0.5),
        HF_STASH: hf_only,
    }
    chat.update({k: hf[k] for k in _SHARED_TOP if k in hf})
    if "dtype" in hf and "torch_dtype" not in hf:  # the spelling of transformers < 4.56, which vLLM may run on
        chat["torch_dtype"] = hf["dtype"]
        hf_only["torch_dtype_added"] = True
    if template is not None:
        chat["template"] = template
    return chat
