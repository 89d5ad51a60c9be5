"""Starting a Ray Train run for a stage: scaling, storage (so a rerun resumes), and clear failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from r1v.core import storage
from r1v.core.config import TrainerConfig
from r1v.core.errors import NotRetryable
from r1v.core.fs import atomic_write_text
from r1v.core.noise import quiet_worker


def worker_context() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def setup_worker(trainer: TrainerConfig) -> tuple[int, int]:
    """Per-worker process settings: thread count (2-core machines oversubscribe fast), seeds, and less noise."""
    import random
    import warnings

    import numpy as np
    import torch


    quiet_worker(trainer.use_gpu)  # before DeepSpeed picks its accelerator
    # DeepSpeed still calls torch.distributed's deprecated collectives: one warning per call floods the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    torch.set_num_threads(trainer.torch_threads)
    rank, world = worker_context()
    random.seed(trainer.seed + rank)
    np.random.seed(trainer.seed + rank)
    torch.manual_seed(trainer.seed)
    return rank, world


def worker_dir(cfg: dict[str, Any]) -> Path:
    """Where a worker writes the stage's files: the stage's directory, which every node sees when the run root is
    a path; with an object-store run root (`cfg["stage_uri"]`) a node-local scratch directory whose files the
    worker uploads (`publish`), since the driver's directory is on another node."""
    uri = cfg.get("stage_uri")
    if not uri:
        return Path(cfg["stage_dir"])
    import hashlib

    return storage.cache_root() / "out" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def publish(cfg: dict[str, Any], rel: str) -> None:
    """Upload `rel` (a file, or a directory with its manifest) of `worker_dir(cfg)` into the stage's directory in
    the store; nothing to do when the run root is a path."""
    uri = cfg.get("stage_uri")
    if not uri:
        return
    src = worker_dir(cfg) / rel
    if src.is_dir():
        storage.upload_dir(src, storage.join(uri, rel))
    elif src.is_file():
        storage.upload_file(src, storage.join(uri, rel))


def staged(c: Any) -> Any:
    """Config `c` with its `model` and `corpus` read from this node's copies (`storage.stage_local`: the path as
    it is when it exists here; else downloaded from the store once per node, checksums checked)."""
    upd = {k: str(storage.stage_local(v)) for k in ("model", "corpus") if isinstance(v := getattr(c, k, None), str)}
    return c.model_copy(update=upd)


def fetch_outputs(stage_uri: str | None, stage_dir: Path, keep: Callable[[str], bool]) -> None:
    """Driver side: download the files of the stage's directory in the store that `keep` selects (what the
    workers uploaded and the driver reads: counts, row records) into the driver's stage directory."""
    if not stage_uri:
        return
    for rel in storage.list_files(stage_uri):
        if keep(rel):
            storage.download_file(storage.join(stage_uri, rel), stage_dir / rel)


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], trainer: TrainerConfig,
        storage_dir: Path, keep_checkpoints: int):
    """Run `loop` on the workers. Re-running with the same storage resumes from its latest checkpoint.

    Checkpoints go to `storage_dir`, or, when `loop_config["stage_uri"]` names the stage in an object store, to
    its `ray/` there (through pyarrow's filesystem, as Ray Train's `storage_filesystem`): a checkpoint every node
    reads, so a worker group restarted on other nodes resumes from it.

    No Ray datasets are handed to Ray Train: its split decides which rows a worker gets as they stream (unequal
    on small corpora, different on every run), while resume needs the rows given by what a checkpoint records;
    each SFT worker reads its own rows (`r1v.train.sft.rank_rows`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    uri = loop_config.get("stage_uri")
    if uri:
        fs, path = storage.filesystem(storage.join(uri, "ray"))
        where: dict[str, Any] = {"storage_path": path, "storage_filesystem": fs}
        marker: str | Path = storage.join(uri, "ray", NOT_RETRYABLE)
    else:
        storage_dir.mkdir(parents=True, exist_ok=True)
        where, marker = {"storage_path": str(storage_dir.resolve())}, storage_dir / NOT_RETRYABLE
    _clear(marker)  # a new attempt of the stage (the user fixed the cause) tries again
    t = TorchTrainer(
        _fail_once(loop, marker),
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                                     resources_per_worker={"CPU": trainer.cpus_per_worker}),
        run_config=RunConfig(name="train", **where,
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             failure_config=FailureConfig(max_failures=trainer.max_failures)),
    )
    result = t.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


NOT_RETRYABLE = "not-retryable.txt"


def _read(marker: str | Path) -> str | None:
    if storage.is_uri(marker):
        data = storage.get_bytes(str(marker))
        return None if data is None else data.decode()
    return Path(marker).read_text() if Path(marker).exists() else None


def _clear(marker: str | Path) -> None:
    if storage.is_uri(marker):
        storage.delete(str(marker))
    else:
        Path(marker).unlink(missing_ok=True)


def _fail_once(loop: Callable[[dict[str, Any]], None], marker: str | Path) -> Callable[[dict[str, Any]], None]:
    """`loop`, but a NotRetryable error is recorded, and a worker group that Ray Train restarts after it fails at
    once with the same message instead of training up to the error again."""

    def wrapped(cfg: dict[str, Any]) -> None:
        seen = _read(marker)
        if seen is not None:
            raise NotRetryable(f"not retried: {seen}")
        try:
            loop(cfg)
        except NotRetryable as e:
            if storage.is_uri(marker):
                storage.put_bytes(str(marker), f"{type(e).__name__}: {e}".encode())
            else:
                atomic_write_text(marker, f"{type(e).__name__}: {e}")
            raise

    return wrapped
