"""One lazy reader of safetensors weights, for every part of r1v that reads checkpoints tensor by tensor
(conversion, manifests, the vLLM engine's checks): headers only until a tensor is asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class Weights:
    """The tensors of a directory (its shard index, else `model.safetensors`, else every `*.safetensors` in it) or
    of one safetensors file, opened lazily. `FileNotFoundError` when there are none."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self._open: dict[Path, Any] = {}
        if path.is_file():
            self.dir, files = path.parent, [path]
        elif (path / INDEX).is_file():
            self.dir = path
            self.weight_map: dict[str, Path] = {k: path / f for k, f in
                                                json.loads((path / INDEX).read_text())["weight_map"].items()}
            return
        else:
            self.dir = path
            files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
                path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no safetensors weights (model.safetensors, {INDEX} or *.safetensors)")
        self.weight_map = {k: f for f in files for k in self._file(f).keys()}

    def _file(self, f: Path) -> Any:
        if f not in self._open:
            from safetensors import safe_open  # the first read: importing this module stays free of it

            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, key: str) -> Path:
        return self.weight_map[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(self.weight_map[key]).get_slice(key).get_shape())

    def itemsize(self, key: str) -> int:
        return DTYPE_BYTES.get(self._file(self.weight_map[key]).get_slice(key).get_dtype(), 1)

    def get(self, key: str) -> torch.Tensor:
        return self._file(self.weight_map[key]).get_tensor(key)
