"""Starting a Ray Train run for a stage: scaling, storage (so a rerun resumes), and clear failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], trainer: TrainerConfig,
        storage: Path, keep_checkpoints: int):
    """Run `loop` on the workers. Re-running with the same `storage` resumes from its latest checkpoint.

    No Ray datasets are handed to Ray Train: its split decides which rows a worker gets as they stream (unequal
    on small corpora, different on every run), while resume needs the rows given by what a checkpoint records;
    each SFT worker reads its own rows (`r1v.train.sft.rank_rows`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / NOT_RETRYABLE
    marker.unlink(missing_ok=True)  # a new attempt of the stage (the user fixed the cause) tries again
    t = TorchTrainer(
        _fail_once(loop, marker),
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if trainer.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                                     resources_per_worker={"CPU": trainer.cpus_per_worker}),
        run_config=RunConfig(name="train", storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             failure_config=FailureConfig(max_failures=trainer.max_failures)),
    )
    result = t.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result


NOT_RETRYABLE = "not-retryable.txt"


def _fail_once(loop: Callable[[dict[str, Any]], None], marker: Path) -> Callable[[dict[str, Any]], None]:
    """`loop`, but a NotRetryable error is recorded, and a worker group that Ray Train restarts after it fails at
    once with the same message instead of training up to the error again."""

    def wrapped(cfg: dict[str, Any]) -> None:
        if marker.exists():
            raise NotRetryable(f"not retried: {marker.read_text()}")
        try:
            loop(cfg)
        except NotRetryable as e:
            atomic_write_text(marker, f"{type(e).__name__}: {e}")
            raise

    return wrapped
