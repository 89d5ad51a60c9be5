"""Checksums of weight directories: each full checkpoint's weight files hashed once and the digest recorded beside
them (`r1v_checksums.json`, or a per-user cache for read-only directories), so that manifests built on them can
name their parts by digest without hashing them again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from r1v.core.fs import atomic_write_json, read_json
from r1v.model.weights import INDEX

FORMAT = 1
CHECKSUMS = "r1v_checksums.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


class ManifestError(ValueError):
    """A manifest model directory cannot be resolved: a part is missing or changed, or a tensor does not fit."""


def weight_files(directory: Path) -> list[Path]:
    """The files whose bytes are the weights: safetensors files and the shard index."""
    return sorted(f for f in directory.iterdir()
                  if f.is_file() and (f.name.endswith(".safetensors") or f.name == INDEX))


def _stamp(directory: Path) -> list[list[Any]]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weight_files(directory)]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def _hash_dir(directory: Path, stamp: list[list[Any]]) -> dict[str, Any]:
    per_file = {name: _file_sha256(directory / name) for name, _, _ in stamp}
    digest = hashlib.sha256("".join(f"{n} {s}\n" for n, s in sorted(per_file.items())).encode()).hexdigest()
    return {"format": FORMAT, "files": stamp, "sha256": digest, "file_sha256": per_file}


def _cache_file(directory: Path) -> Path:
    root = Path(os.environ.get("R1V_CACHE_DIR") or Path.home() / ".cache" / "r1v")
    return root / "checksums" / f"{hashlib.sha1(str(directory).encode()).hexdigest()[:24]}.json"


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return read_json(path) or {}
    except (OSError, ValueError):
        return {}


def record_checksums(directory: str | os.PathLike) -> str | None:
    """Hash `directory`'s weight files and record the digest beside them (`r1v_checksums.json`); called by the
    writers of full checkpoints, so that manifests built on them never hash them again. None without weights."""
    d = Path(directory)
    stamp = _stamp(d)
    if not stamp:
        return None
    record = _hash_dir(d, stamp)
    atomic_write_json(d / CHECKSUMS, record)
    return record["sha256"]


def dir_sha256(directory: str | os.PathLike, rehash: bool = False) -> str:
    """The digest of a directory's weight files: from its record (beside it, else in the cache) while the files'
    sizes and mtimes are those recorded, else hashed now and cached."""
    d = Path(directory).absolute()
    stamp = _stamp(d)
    if not stamp:
        raise ManifestError(f"{d} holds no safetensors weights (only safetensors checkpoints can be parts)")
    if not rehash:
        for path in (d / CHECKSUMS, _cache_file(d)):
            record = _read_record(path)
            if record.get("files") == stamp and isinstance(record.get("sha256"), str):
                return record["sha256"]
    record = _hash_dir(d, stamp)
    try:
        atomic_write_json(_cache_file(d), {**record, "path": str(d)})
    except OSError:
        pass  # no cache: hashed again next time
    return record["sha256"]


def _record_sha(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- parts
