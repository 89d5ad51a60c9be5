"""Convert checkpoints between r1v's HF layout and the InternVL-chat layout of the released Skywork-R1V weights.

Tensor by tensor, streamed: one output shard at a time is in memory. Names and config fields are mapped by
`r1v.model.convert_keys`; fused `attn.qkv` is split into / joined from `q_proj`, `k_proj`, `v_proj` (rows in
that order, as InternViT's `qkv(x).chunk(3, dim=-1)` reads them). Every HF-side tensor is checked against the
shape that an `InternVLForConditionalGeneration` built from the (converted) config has, on the meta device; a
tensor with no place or the wrong shape is an error naming it. Nothing is dropped, nothing is cast.

Tokenizer files, chat template, generation config and other side files are copied; the output directory is
written atomically. `hf_view` gives `load_model` an HF directory for either layout (converted once, cached).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from r1v.core.fs import atomic_directory, read_json
from r1v.model.checksums import record_checksums
from r1v.model.convert_keys import (
    CHAT_ARCHITECTURES,
    CHAT_MODEL_TYPES,
    HF_ARCHITECTURE,
    HF_STASH,
    ConversionError,
    Entry,
    chat_config_to_hf,
    hf_config_to_chat,
    hf_disk_key,
    plan_to_chat,
    plan_to_hf,
)
from r1v.model.tokens import IMG_CONTEXT
from r1v.model.weights import INDEX, Weights

__all__ = ["ConversionError", "detect_layout", "hf_view", "read_hf_tensors", "to_hf", "to_internvl_chat"]

log = logging.getLogger(__name__)

PROVENANCE = "r1v_conversion.json"
"""Written into every converted directory: source path, direction and a stamp of the source files."""
DEFAULT_SHARD_BYTES = 5 * 2**30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
_NOT_COPIED = ("config.json", PROVENANCE, "r1v_checksums.json", "r1v_manifest.json")


def detect_layout(path: str | os.PathLike) -> str | None:
    """The layout of the checkpoint in `path` from its config.json: "hf", "internvl-chat" (InternVLChatModel,
    SkyworkR1VChatModel) or None."""
    cfg = read_json(Path(path) / "config.json") or {}
    archs = set(cfg.get("architectures") or [])
    if "llm_config" in cfg or cfg.get("model_type") in CHAT_MODEL_TYPES or archs & CHAT_ARCHITECTURES:
        return "internvl-chat"
    if cfg.get("model_type") == "internvl" or HF_ARCHITECTURE in archs:
        return "hf"
    return None


def _weights(directory: Path) -> Weights:
    try:
        return Weights(directory)
    except FileNotFoundError as e:
        raise ConversionError(f"{e} (only safetensors weights convert)") from None


def _entry_shape(e: Entry, w: Weights) -> tuple[int, ...]:
    shapes = [w.shape(k) for k in e.srcs]
    if e.op == "cat":
        if len(set(shapes)) != 1:
            raise ConversionError(f"cannot fuse {e.dst!r}: {dict(zip(e.srcs, shapes, strict=True))} differ in shape")
        return (shapes[0][0] * len(shapes), *shapes[0][1:])
    if e.op in ("q", "k", "v"):
        if not shapes[0] or shapes[0][0] % 3:
            raise ConversionError(f"fused {e.srcs[0]!r} has shape {list(shapes[0])}: its rows do not split in 3")
        return (shapes[0][0] // 3, *shapes[0][1:])
    return shapes[0]


def _tensor(e: Entry, w: Weights, memo: dict[str, torch.Tensor]) -> torch.Tensor:
    if e.op == "copy":
        return w.get(e.srcs[0])
    if e.op == "cat":
        return torch.cat([w.get(k) for k in e.srcs], dim=0)
    if e.srcs[0] not in memo:  # q, k, v of one fused tensor come one after the other
        memo.clear()
        memo[e.srcs[0]] = w.get(e.srcs[0])
    return memo[e.srcs[0]].chunk(3, dim=0)["qkv".index(e.op)].clone()


def expected_hf_shapes(hf_config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({HF disk name: shape} of the model `hf_config` describes, names that may be absent (a tied lm_head))."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    try:
        config = InternVLConfig.from_dict(copy.deepcopy(hf_config))
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"the HF config does not build an InternVL model: {e}") from e
    shapes = {hf_disk_key(k): tuple(t.shape) for k, t in model.state_dict().items()}
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    return shapes, {"language_model.lm_head.weight"} if tied else set()


def _check_hf(found: dict[str, tuple[int, ...]], origin: dict[str, str], hf_config: dict[str, Any]) -> None:
    expected, optional = expected_hf_shapes(hf_config)
    for key, shape in found.items():
        src = "" if origin[key] == key else f" (from {origin[key]!r})"
        if key not in expected:
            raise ConversionError(f"tensor {key!r}{src} is not in the InternVL model its config describes")
        if tuple(shape) != expected[key]:
            raise ConversionError(
                f"tensor {key!r}{src} has shape {list(shape)} but the config implies {list(expected[key])}"
            )
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        raise ConversionError(f"{len(missing)} tensors the config implies are missing, e.g. {missing[:3]}")


def _write_weights(
    dst: Path, entries: list[Entry], shapes: dict[str, tuple[int, ...]], w: Weights, max_shard_bytes: int
) -> None:
    sizes = [math.prod(shapes[e.dst]) * w.itemsize(e.srcs[0]) for e in entries]
    shards: list[list[Entry]] = []
    total = 0
    for e, n in zip(entries, sizes, strict=True):
        if not shards or (total and total + n > max_shard_bytes):
            shards.append([])
            total = 0
        shards[-1].append(e)
        total += n
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        memo: dict[str, torch.Tensor] = {}
        tensors = {e.dst: _tensor(e, w, memo) for e in shard}
        save_file(tensors, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors, memo
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (dst / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _stamp(src: Path) -> list[list[Any]]:
    return [
        [f.name, f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(src.iterdir())
        if f.is_file() and f.name != PROVENANCE
    ]


def _write_dir(
    src: Path,
    dst: Path,
    config: dict[str, Any],
    entries: list[Entry],
    shapes: dict[str, tuple[int, ...]],
    w: Weights,
    layout: str,
    max_shard_bytes: int,
) -> Path:
    if dst.absolute() == src.absolute():
        raise ConversionError(f"{dst}: the output must not be the source directory")
    with atomic_directory(dst) as tmp:
        _write_weights(tmp, entries, shapes, w, max_shard_bytes)
        for f in sorted(src.iterdir()):  # tokenizer, chat template, generation config, remote code, README ...
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        provenance = {"source": str(src.absolute()), "layout": layout, "source_stamp": _stamp(src)}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        record_checksums(tmp)  # a base that manifests can name without hashing it again
    return dst.absolute()


def _source(src: str | os.PathLike, layout: str) -> tuple[Path, dict[str, Any]]:
    p = Path(src)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {p}: {p / 'config.json'} does not exist")
    if (p / "r1v_manifest.json").is_file():
        raise ConversionError(f"{p} holds a projector and a manifest of frozen parts, not full weights: "
                              f"`r1v export {p} --out DIR --layout {'internvl-chat' if layout == 'hf' else 'hf'}`")
    found = detect_layout(p)
    if found != layout:
        raise ConversionError(
            f"{p} is {'an unknown' if found is None else 'an ' + repr(found)} layout, expected {layout!r}"
        )
    return p, json.loads((p / "config.json").read_text())


def tokenizer_token_id(directory: str | os.PathLike, token: str) -> int | None:
    """Id of `token` read from the tokenizer files alone (no tokenizer class needed), or None."""
    d = Path(directory)
    data = read_json(d / "tokenizer.json") or {}
    for t in data.get("added_tokens", []):
        if t.get("content") == token:
            return int(t["id"])
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    for i, t in ((read_json(d / "tokenizer_config.json") or {}).get("added_tokens_decoder") or {}).items():
        if t.get("content") == token:
            return int(i)
    for name in ("added_tokens.json", "vocab.json"):
        if token in (table := read_json(d / name) or {}):
            return int(table[token])
    return None


def to_internvl_chat(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variant: str | None = None,
    template: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """HF InternVL checkpoint `src` -> InternVL-chat checkpoint `dst` (`variant` "skywork" for
    SkyworkR1VChatModel; default: what the source was converted from, else InternVLChatModel)."""
    p, hf = _source(src, "hf")
    chat = hf_config_to_chat(hf, variant, template)
    w = _weights(p)
    origin = {hf_disk_key(k): k for k in w.keys()}
    if len(origin) != len(w.keys()):
        raise ConversionError(f"{p}: a tensor is stored under two spellings (e.g. lm_head.* and language_model.*)")
    _check_hf({k: w.shape(o) for k, o in origin.items()}, origin, hf)
    entries = plan_to_chat(w.keys())
    shapes = {e.dst: _entry_shape(e, w) for e in entries}
    return _write_dir(p, Path(dst), chat, entries, shapes, w, "internvl-chat", max_shard_bytes)


def to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """InternVL-chat / Skywork-R1V checkpoint `src` -> HF InternVL checkpoint `dst` (loads with `load_model`)."""
    p, chat = _source(src, "internvl-chat")
    token_id = tokenizer_token_id(p, IMG_CONTEXT)
    if token_id is None and "image_token_id" not in (chat.get(HF_STASH) or {}):
        raise ConversionError(f"{p}: the tokenizer files hold no {IMG_CONTEXT!r} token, so image_token_id is unknown")
    hf = chat_config_to_hf(chat, token_id)
    w = _weights(p)
    entries = plan_to_hf(w.keys())
    shapes = {e.dst: _entry_shape(e, w) for e in entries}
    _check_hf(shapes, {e.dst: e.srcs[0] for e in entries}, hf)
    return _write_dir(p, Path(dst), hf, entries, shapes, w, "hf", max_shard_bytes)


def read_hf_tensors(
    path: str | os.PathLike, prefixes: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config, {HF disk name: tensor} for the names under `prefixes`) of an HF or InternVL-chat checkpoint,
    reading only those tensors (e.g. a vision tower and projector without the LLM)."""
    p = Path(path)
    layout = detect_layout(p)
    if layout is None:
        raise ConversionError(
            f"{p}: not an InternVL checkpoint (HF InternVLForConditionalGeneration or InternVL-chat / Skywork-R1V)"
        )
    cfg = json.loads((p / "config.json").read_text())
    w = _weights(p)
    if layout == "hf":
        entries = [Entry(hf_disk_key(k), (k,)) for k in w.keys()]
    else:
        cfg = chat_config_to_hf(cfg, tokenizer_token_id(p, IMG_CONTEXT))
        entries = plan_to_hf(w.keys())
    memo: dict[str, torch.Tensor] = {}
    return cfg, {e.dst: _tensor(e, w, memo) for e in entries if e.dst.startswith(prefixes)}


def hf_view(path: str | os.PathLike) -> Path:
    """`path` itself unless it holds an InternVL-chat checkpoint; then an HF conversion of it, made once and
    reused while the source files are unchanged: `.<name>.r1v-hf` beside it, or under the temp dir when the
    parent is not writable."""
    p = Path(path)
    if detect_layout(p) != "internvl-chat":
        return p
    stamp = _stamp(p)
    digest = hashlib.sha1(str(p.absolute()).encode()).hexdigest()[:16]
    caches = (p.parent / f".{p.name}.r1v-hf", Path(tempfile.gettempdir()) / "r1v-hf" / digest)
    for cache in caches:
        if (read_json(cache / PROVENANCE) or {}).get("source_stamp") == stamp:
            return cache
    for cache in caches:
        try:
            log.info("converting InternVL-chat checkpoint %s to the HF layout in %s", p, cache)
            return to_hf(p, cache)
        except PermissionError:
            continue
    raise PermissionError(f"cannot write an HF conversion of {p} beside it or under {caches[1].parent}")


def with_hf_model(c: Any) -> Any:
    """Config `c` with its `model` in the HF layout: an InternVL-chat / Skywork-R1V checkpoint is converted once,
    in the workflow's driver, so that workers and engines never race to convert it."""
    return c.model_copy(update={"model": str(hf_view(c.model))})
