"""Stage outputs that hold what a stage changed, not a copy of the model: the projector plus a manifest naming
the frozen parts it was built on (at 38B a full copy per stage is 77 GB in bf16, the projector 184 MB).

A projector-only stage (SFT or GRPO with `trainable: [projector]`) and `reassemble` write as their `model/`:

    config.json              the whole model's InternVLConfig (AutoConfig, `vision_geometry`, `is_vlm_dir` read it)
    generation_config.json   tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...)
    projector.safetensors    the `multi_modal_projector.*` tensors (HF names), in the dtype they trained in
    r1v_manifest.json        {"format": 1, "projector": "projector.safetensors", "built_from": BASE_DIR,
                              "parts": {"vision_tower": PART, "language_model": PART}}

    PART = {"path": absolute directory, "layout": "vlm" | "llm" | "vision" | "manifest",
            "sha256": digest of the directory's weight files, "files": [[name, bytes, mtime_ns], ...]}

Layouts: `vlm` an HF InternVLForConditionalGeneration checkpoint (the part is its `vision_tower.*` or
`language_model.*` tensors); `llm` a causal LM checkpoint (`model.*`, `lm_head.*`: the language model); `vision`
an InternVLVisionModel checkpoint (the vision tower); `manifest` another manifest directory (its part of the same
name, resolved in turn; `sha256` then digests that part's record). Writers flatten: a stage built on a manifest
copies the base's part records, so a chain of stages names the original parts, never an intermediate stage; a
`manifest` part resolves recursively (cycles refused).

Checksums without reading 77 GB per stage. A part's `sha256` digests the sha256 of each weight file of its
directory (`*.safetensors`, the shard index). It is computed once per directory: `save_model` / `save_llm` and
full exports record it beside the weights (`r1v_checksums.json`, keyed by each file's size and mtime); a directory
r1v did not write (a download, the shipped world) is hashed on first use into a cache (`$R1V_CACHE_DIR`, default
~/.cache/r1v, under `checksums/`). Loading compares each part's files' sizes and mtimes with those the manifest
recorded: equal, the recorded digest stands without reading a byte; different (copied, touched, rewritten), the
directory's digest is taken again (from its record or by hashing) and must equal the recorded one. A part whose
directory is gone or whose weights changed is a ManifestError naming the part, the path and what differs: a moved
or changed base never loads silently. (A rewrite that keeps every file's size and mtime is noticed only by
`verify(path, rehash=True)`.)

Loading (`load_manifest_model`, reached through `r1v.model.io.load_model`) builds the model from config.json and
the parts' tensors plus the projector, each tensor's name and shape checked against what the config implies.
`model_tensors` streams (name, loader) pairs of either kind of directory (ZeRO-3 loading, export);
`r1v.model.full_export.export_full` writes a complete HF checkpoint tensor by tensor in the stored dtypes
(`r1v export`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1v.core.fs import atomic_directory
from r1v.core.storage import stage_local
from r1v.model.checksums import (
    _WEIGHT_SUFFIXES,
    CHECKSUMS,
    FORMAT,
    ManifestError,
    _record_sha,
    _stamp,
    dir_sha256,
)
from r1v.model.convert_keys import hf_disk_key
from r1v.model.weights import Weights

if TYPE_CHECKING:
    import torch
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase

MANIFEST = "r1v_manifest.json"
PROJECTOR_FILE = "projector.safetensors"
"""Beside the weights r1v writes: {"files": [[name, bytes, mtime_ns], ...], "sha256": ..., "file_sha256": {...}}."""
PARTS = ("vision_tower", "language_model")
PART_PREFIX = {"vision_tower": "vision_tower.", "language_model": "language_model."}
PROJECTOR_PREFIX = "multi_modal_projector."
LAYOUTS = ("vlm", "llm", "vision", "manifest")
SHARD_BYTES = 5 * 2**30
_RECORDS = (MANIFEST, CHECKSUMS, "r1v_conversion.json")
_MAX_CHAIN = 32


# ------------------------------------------------------------------------------------------------- checksums


def is_manifest_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    d = Path(directory)
    try:
        m = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise ManifestError(f"{d} is not a manifest model directory (no {MANIFEST})") from None
    except ValueError as e:
        raise ManifestError(f"{d / MANIFEST}: not valid JSON ({e})") from e
    if m.get("format") != FORMAT:
        raise ManifestError(f"{d / MANIFEST}: format {m.get('format')!r}, this r1v reads format {FORMAT}")
    parts = m.get("parts") or {}
    if sorted(parts) != sorted(PARTS):
        raise ManifestError(f"{d / MANIFEST}: parts {sorted(parts)}, expected {list(PARTS)}")
    return m


def part_record(path: str | os.PathLike, layout: str, name: str) -> dict[str, Any]:
    """The manifest record of part `name` taken from the directory `path` in `layout` (hashes it at most once)."""
    p = Path(path).absolute()
    if name not in PARTS:
        raise ManifestError(f"unknown part {name!r}: parts are {list(PARTS)}")
    if layout not in LAYOUTS:
        raise ManifestError(f"part {name!r}: unknown layout {layout!r}, expected one of {list(LAYOUTS)}")
    if (layout, name) in (("llm", "vision_tower"), ("vision", "language_model")):
        raise ManifestError(f"part {name!r} cannot come from a {layout!r} directory ({p})")
    if layout == "manifest":
        target = read_manifest(p)["parts"][name]
        return {"path": str(p), "layout": layout, "sha256": _record_sha(target),
                "files": [[MANIFEST, (p / MANIFEST).stat().st_size, (p / MANIFEST).stat().st_mtime_ns]]}
    return {"path": str(p), "layout": layout, "sha256": dir_sha256(p), "files": _stamp(p)}


def _verify_part(name: str, rec: dict[str, Any], where: Path, rehash: bool) -> None:
    p = stage_local(rec.get("path", ""))  # a part staged on another node is staged on this one
    layout = rec.get("layout")
    if layout not in LAYOUTS:
        raise ManifestError(f"{where / MANIFEST}: part {name!r} has unknown layout {layout!r}")
    if not p.is_dir():
        raise ManifestError(f"{where}: part {name!r} is built on {p}, which does not exist (moved or deleted?): "
                            f"restore it there, or re-run the stage that wrote {where}")
    if layout == "manifest":
        got = _record_sha(read_manifest(p)["parts"][name])
    elif rehash or _stamp(p) != rec.get("files"):
        got = dir_sha256(p, rehash=rehash)
    else:
        return
    if got != rec.get("sha256"):
        raise ManifestError(
            f"{where}: part {name!r} at {p} has changed since this model was written: its weights' sha256 is "
            f"{got[:16]}..., the manifest records {str(rec.get('sha256'))[:16]}...; restore the original, or "
            f"re-run the stage that wrote {where} on the new base")


def _source_record(directory: Path, name: str, rehash: bool) -> dict[str, Any]:
    """Part `name` of manifest `directory` followed through `manifest` parts to the record of its source, each
    record on the way verified."""
    at, seen = directory, []
    while True:
        if at in seen or len(seen) > _MAX_CHAIN:
            raise ManifestError(f"{directory}: part {name!r}: the manifests form a cycle or too long a chain: "
                                f"{[str(s) for s in seen]}")
        seen.append(at)
        rec = read_manifest(at)["parts"][name]
        _verify_part(name, rec, at, rehash)
        if rec["layout"] != "manifest":
            return copy.deepcopy(rec)
        at = stage_local(rec["path"])


def resolve_parts(directory: str | os.PathLike, rehash: bool = False) -> dict[str, tuple[Path, str]]:
    """{part: (directory, layout)} with every record verified and `manifest` parts followed to their source; a
    full HF directory is its own two parts."""
    d = Path(directory).absolute()
    if not is_manifest_dir(d):
        return {name: (d, "vlm") for name in PARTS}
    out = {}
    for name in PARTS:
        rec = _source_record(d, name, rehash)
        out[name] = (stage_local(rec["path"]), rec["layout"])
    return out


def verify(directory: str | os.PathLike, rehash: bool = False) -> dict[str, tuple[Path, str]]:
    """Check a manifest directory's parts (by stamp, or by hashing every part with `rehash`); returns them."""
    return resolve_parts(directory, rehash)


def base_parts(base: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The part records of a model built on `base`: a manifest's own, verified and flattened (a `manifest` part
    replaced by its source's record), or a full HF directory's two parts."""
    d = Path(base).absolute()
    if not is_manifest_dir(d):
        return {name: part_record(d, "vlm", name) for name in PARTS}
    return {name: _source_record(d, name, False) for name in PARTS}


# ------------------------------------------------------------------------------------------------- tensors


def _weights(path: Path) -> Weights:
    return Weights(path)


def _disk_key(key: str, name: str, layout: str, where: Path) -> str | None:
    """The HF name of tensor `key` of a `layout` directory if it belongs to part `name`, else None."""
    if layout == "vlm":
        k = hf_disk_key(key)
        return k if k.startswith(PART_PREFIX[name]) else None
    if layout == "llm":
        if not key.startswith(("model.", "lm_head.")):
            raise ManifestError(f"{where}: tensor {key!r} is not a causal LM's (model.* or lm_head.*)")
        return "language_model." + key
    return "vision_tower." + key  # "vision"


Source = tuple[Any, str]
"""(a lazy safetensors reader, the tensor's name in it)."""


def tensor_sources(model_dir: str | os.PathLike) -> dict[str, Source]:
    """{HF tensor name: where to read it} of a full HF directory or a manifest directory (parts verified)."""
    d = Path(model_dir).absolute()
    if not is_manifest_dir(d):
        w = _weights(d)
        return {hf_disk_key(k): (w, k) for k in w.keys()}
    out: dict[str, Source] = {}
    readers: dict[Path, Any] = {}
    for name, (path, layout) in resolve_parts(d).items():
        w = readers.setdefault(path, _weights(path))
        found = {k: (w, src) for src in w.keys() if (k := _disk_key(src, name, layout, path)) is not None}
        if not found:
            raise ManifestError(f"{d}: part {name!r} ({layout} directory {path}) holds no {name} tensors")
        out.update(found)
    proj = _projector_reader(d)
    for k in proj.keys():
        if not k.startswith(PROJECTOR_PREFIX):
            raise ManifestError(f"{d / PROJECTOR_FILE}: tensor {k!r} is not a projector tensor")
        out[k] = (proj, k)
    return out


def _projector_reader(d: Path) -> Any:
    name = read_manifest(d).get("projector") or PROJECTOR_FILE
    f = d / name
    if not f.is_file():
        raise ManifestError(f"{d}: the projector file {name} is missing")
    return _weights(f)


def tensor_locations(model_dir: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """{HF tensor name: (safetensors file, the tensor's name in it)} of a full or manifest directory (parts
    verified), for readers of their own (`r1v.train.loading` reads without memory maps)."""
    out = {}
    for key, (w, src) in tensor_sources(model_dir).items():
        out[key] = (w.file_of(src), src)
    return out


def model_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(HF name on disk, loader) for every tensor of a full or manifest directory; a loader reads one tensor."""
    for key, (w, src) in tensor_sources(model_dir).items():
        yield key, (lambda w=w, src=src: w.get(src))


def projector_tensors(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `multi_modal_projector.*` tensors of a full or manifest directory (nothing else is read)."""
    d = Path(model_dir).absolute()
    if is_manifest_dir(d):
        proj = _projector_reader(d)
        return {k: proj.get(k) for k in proj.keys()}

    w = _weights(d)
    return {hf_disk_key(k): w.get(k) for k in w.keys() if hf_disk_key(k).startswith(PROJECTOR_PREFIX)}


def check_tensors(where: str | os.PathLike, config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                  prefix: str = "") -> None:
    """Every name in `shapes` (HF disk names) must be a tensor of the model `config` describes, with its shape; with
    `prefix`, every such tensor of the model under it must be there (all of them without)."""
    # imported on use, to keep torch, safetensors, numpy out of light paths
    from r1v.model.convert import expected_hf_shapes

    expected, optional = expected_hf_shapes(config)
    for key, shape in shapes.items():
        if key not in expected:
            raise ManifestError(f"{where}: tensor {key!r} is not in the model its config.json describes")
        if tuple(shape) != expected[key]:
            raise ManifestError(f"{where}: tensor {key!r} has shape {list(shape)}, the config implies "
                                f"{list(expected[key])}")
    missing = sorted(k for k in set(expected) - set(shapes) - optional if k.startswith(prefix))
    if missing:
        raise ManifestError(f"{where}: {len(missing)} tensors the config implies are missing, e.g. {missing[:3]}")


def _config(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no saved model at {d}: {d / 'config.json'} does not exist") from None


def load_manifest_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Build the model a manifest directory describes (parts verified, tensors checked) in eval mode."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, InternVLForConditionalGeneration

    d = Path(path).absolute()
    sources = tensor_sources(d)
    check_tensors(d, _config(d), {k: w.shape(src) for k, (w, src) in sources.items()})
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    state = {k: w.get(src) for k, (w, src) in sources.items()}
    model = InternVLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or torch.float32)
    del state
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------------- writing


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer, chat template, ... of `src` (no weights, no r1v records)."""
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in _RECORDS and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _write_manifest_dir(out: str | os.PathLike, parts: dict[str, dict[str, Any]], projector: dict[str, Any],
                        built_from: str, fill: Callable[[Path], None]) -> Path:
    from safetensors.torch import save_file

    with atomic_directory(out) as tmp:
        fill(tmp)  # config.json, generation config, tokenizer
        check_tensors(out, _config(tmp), {k: tuple(t.shape) for k, t in projector.items()}, PROJECTOR_PREFIX)
        if any(not k.startswith(PROJECTOR_PREFIX) for k in projector):
            raise ManifestError(f"{out}: not projector tensors: {[k for k in projector][:3]}")
        save_file({k: t.detach().contiguous() for k, t in projector.items()}, str(tmp / PROJECTOR_FILE),
                  metadata={"format": "pt"})
        manifest = {"format": FORMAT, "projector": PROJECTOR_FILE, "built_from": built_from,
                    "parts": {name: parts[name] for name in PARTS}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out).absolute()


def write_projector_model(out: str | os.PathLike, base: str | os.PathLike,
                          projector: dict[str, torch.Tensor]) -> Path:
    """A manifest directory: model `base` (full or manifest) with its projector replaced by `projector` ({HF name:
    tensor}, e.g. `multi_modal_projector.linear_1.weight`). Config and tokenizer files are the base's."""
    b = Path(base).absolute()
    parts = base_parts(b)
    return _write_manifest_dir(out, parts, projector, str(b), lambda tmp: copy_side_files(b, tmp))


def reassemble_model(vlm_dir: str | os.PathLike, llm_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The R1V re-assembly as a manifest: the vision tower of `vlm_dir` (as its manifest names it), its projector,
    and the causal LM in `llm_dir`. Checked as `r1v.model.assemble.reassemble` checks (on the meta device: no
    weight is read but the projector's); the tokenizer is the LLM's."""
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        InternVLForConditionalGeneration,
    )

    from r1v.model.assemble import reassemble
    from r1v.model.convert import hf_view

    vlm_path = hf_view(Path(vlm_dir)).absolute()
    llm_path = Path(llm_dir).absolute()
    llm_cfg_raw = _config(llm_path)
    if "vision_config" in llm_cfg_raw or llm_cfg_raw.get("model_type") == "internvl":
        raise ManifestError(f"{llm_path} holds a VLM: `llm` must be a causal LM directory")
    vlm_cfg = AutoConfig.from_pretrained(vlm_path, local_files_only=True)
    llm_cfg = AutoConfig.from_pretrained(llm_path, local_files_only=True)
    with torch.device("meta"):
        vlm = InternVLForConditionalGeneration(vlm_cfg)
        llm = AutoModelForCausalLM.from_config(llm_cfg)
    if (llm_path / "generation_config.json").is_file():
        llm.generation_config = GenerationConfig.from_pretrained(llm_path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(llm_path, local_files_only=True)
    model = reassemble(vlm, llm, tok, meta=True)
    model.config.architectures = [type(model).__name__]
    for cfg, src in ((model.config, vlm_cfg), (model.config.vision_config, vlm_cfg.vision_config)):
        if getattr(cfg, "dtype", None) is None:  # as `save_pretrained` of the loaded parts would record it
            cfg.dtype = getattr(src, "dtype", None) or torch.float32
    parts = {"vision_tower": base_parts(vlm_path)["vision_tower"],
             "language_model": part_record(llm_path, "llm", "language_model")}

    def fill(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _write_manifest_dir(out, parts, projector_tensors(vlm_path), str(vlm_path), fill)
