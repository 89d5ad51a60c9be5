"""Loading a built world like any local checkpoint, and assembling the recipe's substitute VLM from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def world_dir(world: str | Path | None) -> Path:
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from r1v.world.build import WORLD_DIR

    return Path(world) if world else WORLD_DIR


def substitute_vlm(world: str | Path | None, seed: int, out: Path) -> dict[str, Any]:
    """The world's frozen vision tower + a fresh projector (seeded) + the instruct LLM, saved at `out`."""
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from transformers import InternVLConfig, InternVLVisionModel
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    from r1v.model.assemble import assemble
    from r1v.model.io import load_llm, save_model
    from r1v.model.tiny import DOWNSAMPLE_RATIO
    from r1v.world.build import verify_world

    root = world_dir(world)
    manifest = verify_world(root)
    llm, tok = load_llm(root / "instruct_llm")
    tower = InternVLVisionModel.from_pretrained(root / "vision_tower", local_files_only=True, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = InternVLMultiModalProjector(InternVLConfig(vision_config=tower.config, text_config=llm.config,
                                                               downsample_ratio=DOWNSAMPLE_RATIO))
    vlm = assemble(tower, projector, llm, tok, vision_config=tower.config, downsample_ratio=DOWNSAMPLE_RATIO)
    return {"model": save_model(vlm.eval(), tok, out), "manifest": manifest,
            "instruct_llm": (root / "instruct_llm").resolve(), "reasoning_llm": (root / "reasoning_llm").resolve()}
