"""Configs of the miniature world's stage kinds (`data.world`, `model.world`), validated at workflow load."""

from __future__ import annotations

from pydantic import Field

from r1v.config import STAGE_CONFIGS, Strict


@STAGE_CONFIGS.register("data.world")
class WorldDataConfig(Strict):
    """Render the run's corpora: alignment (perception only), SFT (multimodal chains of thought), GRPO
    prompts, and the held-out test (digit tuples that never appear in any training data)."""

    n_align: int = Field(2000, ge=1, description="perception-only rows for projector alignment")
    n_sft: int = Field(1000, ge=1, description="image problems with reasoning chains for projector SFT")
    n_grpo: int = Field(1000, ge=1, description="image problems (answers only) for GRPO")
    n_test: int = Field(1000, ge=1, description="held-out image problems, levels 1-3 balanced")
    seed: int = 0
    corrupt_rows: int = Field(0, ge=0, description="alignment rows with truncated images (they must be "
                                                   "quarantined, not trained on)")


@STAGE_CONFIGS.register("model.world")
class WorldModelConfig(Strict):
    """The substitute VLM of the recipe: the world's pretrained vision tower, a fresh R1V projector
    (LayerNorm -> Linear -> GELU -> Linear) and the world's instruct LLM; plus the reasoning LLM to re-assemble
    onto later."""

    world: str | None = Field(None, description="a built world directory (default: the one shipped in r1v)")
    seed: int = Field(0, description="projector initialisation")
