"""Full HF checkpoints written tensor by tensor: `r1v export` of a manifest (or HF) directory, and the export of a
stage that trained more than the projector (`r1v.train.engine.export_model`). Shards are held one at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from r1v.core.fs import atomic_directory
from r1v.model.checksums import ManifestError, record_checksums
from r1v.model.manifest import (
    SHARD_BYTES,
    _config,
    check_tensors,
    copy_side_files,
    tensor_sources,
)
from r1v.model.weights import INDEX


class ShardWriter:
    """Tensors -> safetensors shards of at most `max_shard_bytes` (one tensor may exceed it), named as
    `save_pretrained` names them, with the index when there is more than one. Holds one shard at a time."""

    def __init__(self, directory: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
        self.dir, self.max = Path(directory), max_shard_bytes
        self.buf: dict[str, Any] = {}
        self.size = self.total = 0
        self.shards: list[list[str]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.shapes:
            raise ManifestError(f"{self.dir}: tensor {key!r} written twice")
        n = tensor.numel() * tensor.element_size()
        if self.buf and self.size + n > self.max:
            self._flush()
        self.buf[key] = tensor.detach().contiguous()
        self.shapes[key] = tuple(tensor.shape)
        self.size += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buf, str(self.dir / f".shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buf))
        self.buf, self.size = {}, 0

    def close(self) -> None:
        if self.buf or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for i, name in enumerate(names):
            os.replace(self.dir / f".shard-{i:05d}.tmp", self.dir / name)
        if n > 1:
            weight_map = {k: name for name, keys in zip(names, self.shards, strict=True) for k in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def finish_full(tmp: Path, side_from: str | os.PathLike, writer: ShardWriter) -> None:
    """Close a full checkpoint being written in `tmp`: shards, side files of `side_from`, every tensor checked
    against the config, checksums recorded."""
    writer.close()
    copy_side_files(Path(side_from), tmp)
    check_tensors(tmp, _config(tmp), writer.shapes)
    record_checksums(tmp)


def export_full(src: str | os.PathLike, out: str | os.PathLike, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """A complete HF checkpoint at `out` (atomically) of the model in `src`, a manifest or full HF directory (an
    InternVL-chat one is converted); tensor by tensor, in the dtypes they are stored in."""
    # imported on use, to keep safetensors out of light paths
    from r1v.model.convert import detect_layout, to_hf

    s = Path(src).absolute()
    _config(s)
    if detect_layout(s) == "internvl-chat":
        return to_hf(s, out, max_shard_bytes=max_shard_bytes)
    if Path(out).absolute() == s:
        raise ManifestError(f"{out}: the output must not be the source directory")
    sources = tensor_sources(s)
    check_tensors(s, _config(s), {k: w.shape(src) for k, (w, src) in sources.items()})
    with atomic_directory(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, (w, name) in sources.items():
            writer.add(key, w.get(name))
        finish_full(tmp, s, writer)
    return Path(out).absolute()
