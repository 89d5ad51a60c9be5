"""The miniature world's stage kinds: its corpora for one run, and its backbones as the recipe's models."""

from __future__ import annotations

from typing import Any

from r1v.workflow.runner import StageContext
from r1v.world.config import WorldDataConfig, WorldModelConfig


def world_data(ctx: StageContext, c: WorldDataConfig) -> dict[str, Any]:
    # imported on use, to keep pyarrow, PIL, numpy out of light paths
    from r1v.world.corpora import generate

    noise = c.sft_noise.model_dump() if c.sft_noise else None
    paths = generate(ctx.stage_dir / "corpus", c.n_align, c.n_sft, c.n_grpo, c.n_test, c.seed, c.corrupt_rows,
                     noise, c.overthink, c.clarity)
    flawed = {f"rows_sft_{k}": round(v * c.n_sft) for k, v in (noise or {}).items() if v > 0}
    ctx.log.metrics({"rows_align": c.n_align, "rows_sft": c.n_sft, "rows_grpo": c.n_grpo, "rows_test": c.n_test,
                     "rows_corrupted": c.corrupt_rows, **flawed}, 0)
    return {k: str(v) for k, v in paths.items()}


def world_models(ctx: StageContext, c: WorldModelConfig) -> dict[str, Any]:
    # imported on use, to keep torch, numpy, tqdm out of light paths
    import shutil

    from r1v.world.load import substitute_vlm

    out = substitute_vlm(c.world, c.seed, ctx.stage_dir / "substitute_vlm")
    ctx.log.dict(out["manifest"], "world.json")
    ctx.log.metrics({f"text_accuracy_{k}": v["accuracy"] for k, v in out["manifest"]["text_accuracy"].items()}, 0)
    # The LLMs are copied into the stage (2 MB each): where r1v is installed differs between nodes (a submitted
    # job's package is unpacked under each node's own temp dir), the stage's directory is what every node sees.
    llms = {k: shutil.copytree(out[src], ctx.stage_dir / src, dirs_exist_ok=True)
            for k, src in (("llm", "reasoning_llm"), ("instruct_llm", "instruct_llm"))}
    return {"model": str(out["model"]), **{k: str(v) for k, v in llms.items()}}
