"""A training worker's set-up, one path for SFT and GRPO: the process (threads, seeds, noise, the process group)
and rank 0's logger (`start_worker`), then the model (`load_trainable`): loaded (partitioned under ZeRO-3), frozen
but for the trainable groups, with the trainer's activation checkpointing. A trainer setting is then honoured by
both loops or by neither."""

from __future__ import annotations

import os
from typing import Any

from r1v.core.config import Group, TrainerConfig
from r1v.model.freeze import apply_freeze
from r1v.train.engine import apply_activation_checkpointing
from r1v.train.launch import setup_worker
from r1v.train.loading import load_for_training
from r1v.workflow.tracking import RunLogger


def start_worker(trainer: TrainerConfig, tracking_uri: str | None, run_id: str | None
                 ) -> tuple[int, int, RunLogger]:
    """(rank, world size, logger): rank 0 logs to the stage's MLflow run, the other ranks log nothing."""
    rank, world = setup_worker(trainer)
    return rank, world, RunLogger(tracking_uri, run_id) if rank == 0 else RunLogger(None, None)


def load_trainable(model_dir: str | os.PathLike, trainer: TrainerConfig, trainable: list[Group]
                   ) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, parameter counts by group) ready for `init_engine`."""
    model, tok = load_for_training(model_dir, trainer)  # ZeRO-3: partitioned from the start
    counts = apply_freeze(model, trainable)
    if trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, tok, counts
