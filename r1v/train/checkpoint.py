"""Checkpoints through Ray Train: every rank saves its DeepSpeed shard plus our worker state, Ray merges them.

Ray registers a checkpoint only after every rank's files are uploaded, so a crash mid-save leaves the previous
checkpoint as the latest (atomic from the resume side). Our worker state (step, epoch, rows consumed, counts)
travels inside the same checkpoint so that resume skips exactly what was consumed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

TAG = "ds"


def save(engine, step: int, worker_state: dict[str, Any], metrics: dict[str, float], rank: int,
         name: str | None = None) -> None:
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"r1v-ckpt-{rank}-"))
    try:
        # Frozen weights stay out: they are the stage's input model, reloaded from it on resume (at 38B they would
        # add the whole frozen model to every checkpoint).
        engine.save_checkpoint(str(tmp), tag=TAG, exclude_frozen_parameters=True)
        (tmp / f"r1v_state_rank{rank}.json").write_text(json.dumps(worker_state))
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=name or f"step-{step:06d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine, rank: int) -> dict[str, Any] | None:
    """Load the latest checkpoint into `engine`; returns this rank's worker state, or None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=TAG, load_module_strict=False)  # frozen weights: from the model dir
        return json.loads((Path(d) / f"r1v_state_rank{rank}.json").read_text())
