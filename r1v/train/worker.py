"""The model side of a training worker's set-up, one path for SFT and GRPO: load (partitioned under ZeRO-3),
freeze all but the trainable groups, and apply the trainer's activation checkpointing. A trainer setting is then
honoured by both loops or by neither."""

from __future__ import annotations

import os
from typing import Any

from r1v.core.config import Group, TrainerConfig
from r1v.model.freeze import apply_freeze
from r1v.train.engine import apply_activation_checkpointing
from r1v.train.loading import load_for_training


def load_trainable(model_dir: str | os.PathLike, trainer: TrainerConfig, trainable: list[Group]
                   ) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, parameter counts by group) ready for `init_engine`."""
    model, tok = load_for_training(model_dir, trainer)  # ZeRO-3: partitioned from the start
    counts = apply_freeze(model, trainable)
    if trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, tok, counts
