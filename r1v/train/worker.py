"""A training worker's set-up, one path for SFT and GRPO: the process (threads, seeds, noise, the process group),
rank 0's logger (`start_worker`) and progress writer (`worker_progress`), then the model (`load_trainable`):
loaded (partitioned under ZeRO-3), frozen but for the trainable groups, with the trainer's activation
checkpointing. A trainer setting is then honoured by both loops or by neither."""

from __future__ import annotations

import os
from typing import Any

from r1v.core.config import Group, TrainerConfig
from r1v.model.freeze import apply_freeze
from r1v.train.engine import apply_activation_checkpointing
from r1v.train.launch import setup_worker
from r1v.train.loading import load_for_training
from r1v.workflow.progress import Progress
from r1v.workflow.tracking import RunLogger


def start_worker(trainer: TrainerConfig, tracking_uri: str | None, run_id: str | None
                 ) -> tuple[int, int, RunLogger]:
    """(rank, world size, logger): rank 0 logs to the stage's MLflow run, the other ranks log nothing."""
    rank, world = setup_worker(trainer)
    return rank, world, RunLogger(tracking_uri, run_id) if rank == 0 else RunLogger(None, None)


class _NoProgress:
    def update(self, *args: Any, **kw: Any) -> bool:
        return False

    def flush(self) -> None:
        pass


def worker_progress(cfg: dict[str, Any], rank: int, log: RunLogger) -> Progress | _NoProgress:
    """Rank 0's writer of the stage's progress (`r1v.workflow.progress`): into the stage's directory, or with an
    object-store run root its URI (the driver's files are on another node), where the workers already publish;
    the other ranks report nothing."""
    if rank != 0 or not (cfg.get("stage_uri") or cfg.get("stage_dir")):
        return _NoProgress()
    return Progress(cfg.get("stage_uri") or cfg["stage_dir"], log)


def load_trainable(model_dir: str | os.PathLike, trainer: TrainerConfig, trainable: list[Group]
                   ) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, parameter counts by group) ready for `init_engine`."""
    model, tok = load_for_training(model_dir, trainer)  # ZeRO-3: partitioned from the start
    counts = apply_freeze(model, trainable)
    if trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, tok, counts
