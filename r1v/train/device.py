"""Where tensors live: one helper puts a batch on the engine's device, one picks the device collectives use.

Why one place: at 38B the training step runs on GPUs under NCCL, and every tensor that a step builds on the host
(a collated batch, tiles, advantages, a copied reference projector, the floats that metrics all-reduce) must be
moved there; a forgotten one fails only on a GPU. The SFT step, the GRPO update and the collectives call these
helpers, and a CPU test runs them with `device="meta"` to check that nothing bypasses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def to_device(obj: T, device: torch.device | str, dtype: torch.dtype | None = None) -> T:
    """`obj` with every tensor in it (dicts, lists, tuples, nested) on `device`. With `dtype`, floating-point
    tensors are cast too (integer ids and masks keep theirs). Non-tensors pass through unchanged."""
    if isinstance(obj, torch.Tensor):
        cast = dtype if dtype is not None and obj.is_floating_point() else None
        return obj.to(device=device, dtype=cast, non_blocking=True)  # type: ignore[return-value]
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device, dtype) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, dtype) for v in obj)  # type: ignore[return-value]
    return obj


def engine_device(engine: Any) -> torch.device:
    """The device a DeepSpeed engine (or a plain module) computes on."""
    dev = getattr(engine, "device", None)
    if dev is not None:
        return torch.device(dev)
    for p in engine.parameters():
        return p.device
    return torch.device("cpu")


def engine_dtype(engine: Any) -> torch.dtype:
    """The compute dtype of an engine's module (bf16 under DeepSpeed's bf16 mode even if loaded in fp32)."""
    module = getattr(engine, "module", engine)
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in module.parameters():
        return p.dtype
    return torch.float32


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: the current CUDA device under a pure NCCL process group
    (NCCL refuses CPU tensors), else the CPU (gloo, or a `cpu:gloo,cuda:nccl` group, or no group at all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
