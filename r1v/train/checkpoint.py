"""Checkpoints through Ray Train: every rank writes its part into a folder, Ray merges the folders.

Ray registers a checkpoint only after every rank's files are uploaded, so a crash mid-save leaves the previous
checkpoint as the latest (atomic from the resume side).

Two formats (docs/checkpoints.md):
- portable, when only the projector trains: `trainable.safetensors` (each trainable parameter's full fp32
  master copy and its optimizer state, gathered) and `state.json` (step, optimizer step count, LR schedule,
  engine counters, the loop's state). No pickle is read on resume, and the files do not depend on the number of
  workers: a stage may resume on another `trainer.num_workers`.
- DeepSpeed's own (`engine.save_checkpoint`, frozen weights excluded) plus `state.json`, for any other trainable
  set. DeepSpeed loads it with `torch.load(weights_only=False)`, i.e. pickle, and only on the same world size.

Both: optional `arrays.safetensors` (the loop's arrays, e.g. the rows an epoch consumed), optional `rank-R.json`
(a rank's own state), and one `sha256-rank-R.txt` per rank listing every file that rank wrote. Resume checks every
listed digest, and that no unlisted file is there, before anything is loaded: a corrupted (or added) file is
refused by name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1v.core.config import TrainerConfig
from r1v.train.engine import gather_objects, gathered

TAG = "ds"
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
ARRAYS = "arrays.safetensors"
PORTABLE, DEEPSPEED = "r1v-portable-1", "deepspeed"


def portable(trainable: list[str], trainer: TrainerConfig) -> bool:
    """Whether a stage training `trainable` writes the portable format: the projector alone (small enough to
    gather on every save), under ZeRO-3 or without ZeRO in fp32 (the optimizer layouts r1v sets back; ZeRO-1/2
    and DeepSpeed's bf16/fp16 wrappers keep DeepSpeed's format)."""
    return list(trainable) == ["projector"] and (trainer.zero_stage == 3 or
                                                 (trainer.zero_stage == 0 and trainer.dtype == "float32"))


@dataclass
class Restored:
    state: dict[str, Any]  # the loop's state, as saved (the same on every rank)
    arrays: dict[str, np.ndarray]
    rank_state: dict[str, Any] | None  # this rank's own state; None when the world size changed


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sums_name(rank: int) -> str:
    return f"sha256-rank-{rank}.txt"


def save(engine, step: int, state: dict[str, Any], metrics: dict[str, float], rank: int, *, portable: bool,
         name: str | None = None, arrays: dict[str, np.ndarray] | None = None,
         rank_state: dict[str, Any] | None = None) -> None:
    """Write and report a checkpoint; every rank calls it (it gathers). `state` and `arrays` are rank 0's (the
    shared ones), `rank_state` each rank's own."""
    import ray.train

    world = len(gather_objects(None))
    tmp = Path(tempfile.mkdtemp(prefix=f"r1v-ckpt-{rank}-"))
    try:
        if portable:
            tensors, meta = _trainable_state(engine, rank)
        else:
            # Frozen weights stay out: they are the stage's input model, reloaded from it on resume (at 38B they
            # would add the whole frozen model to every checkpoint).
            engine.save_checkpoint(str(tmp), tag=TAG, exclude_frozen_parameters=True)
            tensors, meta = {}, {}
        if rank == 0:
            from safetensors.numpy import save_file

            if portable:
                _save_tensors(tensors, tmp / TRAINABLE)
            if arrays:
                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ARRAYS))
            (tmp / STATE).write_text(json.dumps({"format": PORTABLE if portable else DEEPSPEED, "step": step,
                                                 "world_size": world, **meta, "state": state}))
        if rank_state is not None:
            (tmp / f"rank-{rank}.json").write_text(json.dumps(rank_state))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        (tmp / _sums_name(rank)).write_text("".join(f"{sha256(p)}  {p.relative_to(tmp).as_posix()}\n"
                                                    for p in files))
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=name or f"step-{step:06d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine, rank: int, *, portable: bool) -> Restored | None:
    """Verify, then load the latest checkpoint into `engine`; None on a fresh start. Every rank calls it."""
    import ray.train

    world = len(gather_objects(None))
    registered = ray.train.get_checkpoint()
    # Rank 0 looks, every rank takes its answer: a listing made on each rank could differ.
    newer = gather_objects(_newest_written(registered) if rank == 0 else None)[0]
    choices = [c for c in (newer and ray.train.Checkpoint(
        newer, filesystem=ray.train.get_context().get_storage().storage_filesystem), registered) if c is not None]
    for i, ckpt in enumerate(choices):
        with ckpt.as_directory() as d:
            d = Path(d)
            try:
                verify(d, rank, world)
            except RuntimeError as e:
                if i + 1 == len(choices):
                    raise
                if rank == 0:  # a part half-copied when its writer died: the registered one is whole
                    print(f"r1v: not resuming from {newer} ({e}); taking the checkpoint Ray Train registered",
                          flush=True)
                continue
            return _load(engine, d, rank, world, portable)
    return None


def _load(engine, d: Path, rank: int, world: int, portable: bool) -> Restored:
    """Load the verified checkpoint folder `d` into `engine`."""
    meta = json.loads((d / STATE).read_text())
    want = PORTABLE if portable else DEEPSPEED
    if meta.get("format") != want:
        raise RuntimeError(f"checkpoint {d} is in format {meta.get('format')!r}, this stage writes {want!r} "
                           "(did `trainable` change?): resume it with the settings it was written with")
    if portable:
        _load_trainable(engine, d / TRAINABLE, meta)
    else:
        if meta["world_size"] != world:
            raise RuntimeError(f"checkpoint {d} was written by {meta['world_size']} workers and DeepSpeed's "
                               f"format resumes only on as many (this run has {world}); a stage training the "
                               "projector alone writes a format that resumes on any number")
        engine.load_checkpoint(str(d), tag=TAG, load_module_strict=False)  # frozen weights: from the model
    arrays: dict[str, np.ndarray] = {}
    if (d / ARRAYS).exists():
        from safetensors.numpy import load_file

        arrays = load_file(str(d / ARRAYS))
    own = d / f"rank-{rank}.json"
    rank_state = json.loads(own.read_text()) if meta["world_size"] == world and own.exists() else None
    return Restored(meta["state"], arrays, rank_state)


def _newest_written(registered) -> str | None:
    """`newest_complete` in this Ray Train run's storage, given its registered checkpoint (or None)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return newest_complete(storage.storage_filesystem, storage.experiment_fs_path,
                           registered.path if registered is not None else None)


def newest_complete(fs, base: str, registered: str | None) -> str | None:
    """The path of a checkpoint under `base` (on pyarrow filesystem `fs`) newer than `registered` (Ray Train's
    latest) whose every rank's part is written, or None. Ray Train registers a checkpoint when its controller next
    hears from the workers: a worker that dies after writing one and before that would otherwise send the restart
    back one more interval. Complete means: the state file, every rank's sha256 list (for the world size that
    wrote it) and every file they list are there; the digests are checked before it is used. Newer: a higher step,
    or the same step written later (an epoch's end after its last step)."""
    import pyarrow.fs as pafs

    def step_of(path: str) -> tuple[int, float] | None:
        try:
            with fs.open_input_stream(f"{path}/{STATE}") as f:
                meta = json.loads(f.read())
            files = {i.path[len(path) + 1:]: i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File}
            sums = [_sums_name(r) for r in range(int(meta["world_size"]))]
            if not all(s in files for s in sums):
                return None
            for s in sums:
                with fs.open_input_stream(f"{path}/{s}") as f:
                    listed = [line.partition("  ")[2] for line in f.read().decode().splitlines()]
                if not all(rel in files for rel in listed):
                    return None
            return int(meta["step"]), files[STATE].mtime.timestamp() if files[STATE].mtime else 0.0
        except (OSError, ValueError, KeyError):
            return None

    best = step_of(registered) if registered is not None else None
    newest = None
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or info.path == registered:
            continue
        key = step_of(info.path)
        if key is not None and (best is None or key > best):
            best, newest = key, info.path
    return newest


def verify(d: Path, rank: int, world: int) -> None:
    """Check the checkpoint folder `d` against its sha256 lists; raises on every rank, naming the files, if one
    differs, is missing or is not listed. The ranks share the hashing; every rank calls it (it gathers)."""
    listed: dict[str, str] = {}
    errors: list[str] = []
    sums = sorted(d.glob("sha256-rank-*.txt"))
    if not sums:
        errors.append(f"no sha256 list in checkpoint {d}: refusing to load it")
    for s in sums:
        for line in s.read_text().splitlines():
            digest, _, rel = line.partition("  ")
            listed[rel] = digest
    present = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {s.name for s in sums}
    errors += [f"checkpoint file {d / rel} is not in its sha256 list" for rel in sorted(present - set(listed))]
    errors += [f"checkpoint file {d / rel} is missing" for rel in sorted(set(listed) - present)]
    mine = sorted(set(listed) & present)[rank::world]
    errors += [f"checkpoint file {d / rel}: sha256 mismatch (listed {listed[rel]}, found {got})"
               for rel in mine if (got := sha256(d / rel)) != listed[rel]]
    found = sorted({e for part in gather_objects(errors) for e in part})
    if found:
        raise RuntimeError("refusing to resume from a damaged checkpoint: " + "; ".join(found))


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update: ZeRO and DeepSpeed's bf16 wrapper keep it as `.optimizer`."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _full_fp32(p: torch.nn.Parameter, key: str | None, inner: torch.optim.Optimizer) -> torch.Tensor:
    """The full fp32 master value (key None) or optimizer state of `p`: DeepSpeed's gathering API under ZeRO and
    its bf16 wrapper (a collective there), the parameter itself and its torch state without either."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        out = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:
        out = p.detach() if key is None else inner.state[p][key]
    return out.detach()


def _trainable_state(engine, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every trainable parameter's full fp32 master copy and optimizer state (rank 0 keeps them; all ranks must
    call it) and the JSON side: optimizer step count, LR schedule, engine counters."""
    inner = _inner_optimizer(engine)
    states = list(inner.state.values())
    keys = sorted(k for k, v in states[0].items() if k != "step" and torch.is_tensor(v) and v.dim()) if states else []
    opt_step = float(states[0]["step"]) if states and "step" in states[0] else 0.0
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(engine):  # the projector: gathering it whole is cheap (~100M parameters at 38B)
        for key in (None, *keys):
            t = _full_fp32(p, key, inner)  # on the accelerator; only rank 0 copies it to the host
            if rank == 0:
                tensors[f"{key or 'param'}/{name}"] = t.float().cpu().contiguous()
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    meta = {"optimizer": {"type": type(inner).__name__, "step": opt_step, "state_keys": keys},
            "lr_scheduler": sched,
            "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                       "skipped_steps": engine.skipped_steps}}
    return tensors, meta


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for: ZeRO-3's flat fp32 partitions (handed to the optimizer
    only during its step), else the parameters themselves."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return list(opt.fp32_partitioned_groups_flat)
    return [q for group in _inner_optimizer(engine).param_groups for q in group["params"]]


def _ensure_optimizer_state(engine, keys: list[str], step: float) -> None:
    """Give every tensor the optimizer updates a state with `keys` (zeros) and step count `step`: a fresh torch
    optimizer creates its state in its first step, and the values are then set through DeepSpeed's API."""
    inner = _inner_optimizer(engine)
    for q in _optimizer_tensors(engine):
        st = inner.state[q]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(q, memory_format=torch.preserve_format)
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"].fill_(step)
        else:  # as torch's Adam creates it (a float32 scalar on the CPU unless capturable / fused)
            st["step"] = torch.tensor(step, dtype=torch.float32)


def _load_trainable(engine, path: Path, meta: dict[str, Any]) -> None:
    """Set the engine's trainable parameters (fp32 masters and their working copies), optimizer state, LR
    schedule and counters from a portable checkpoint. Every rank reads the full tensors and sets its part."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    inner = _inner_optimizer(engine)
    opt = meta["optimizer"]
    if opt["type"] != type(inner).__name__:
        raise RuntimeError(f"checkpoint {path} holds {opt['type']} state, this engine's optimizer is "
                           f"{type(inner).__name__}")
    tensors = load_file(str(path))
    expected = {f"{k}/{n}" for n, _ in _trainable(engine) for k in ("param", *opt["state_keys"])}
    if set(tensors) != expected:
        raise RuntimeError(f"checkpoint {path} does not hold this model's trainable parameters: missing "
                           f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    _ensure_optimizer_state(engine, opt["state_keys"], opt["step"])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, p in _trainable(engine):
        value = tensors[f"param/{name}"]
        zero = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
        if zero:
            safe_set_full_fp32_param(p, value)
        # The working copy the forward uses: under ZeRO-3 gathered, set on rank 0, re-partitioned on exit.
        with torch.no_grad(), gathered([p], modifier_rank=0):
            if rank == 0 or not hasattr(p, "ds_id"):
                p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))
        for key in opt["state_keys"]:
            v = tensors[f"{key}/{name}"]
            if zero:
                safe_set_full_optimizer_state(p, v, key)
            else:
                inner.state[p][key].copy_(v.to(inner.state[p][key].device))
    if meta["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        # The LR of the next step was set on the optimizer by the scheduler's last step: set it again.
        for group, lr in zip(engine.optimizer.param_groups, meta["lr_scheduler"]["_last_lr"], strict=True):
            group["lr"] = lr
    for k, v in meta["engine"].items():
        setattr(engine, k, v)
