"""The `grpo` stage kind: GRPO with rule-based rewards, rollouts in engine actors, updates in Ray Train workers."""

from __future__ import annotations

from typing import Any

from r1v.rl.config import GRPOConfig
from r1v.workflow.runner import StageContext


def grpo_stage(ctx: StageContext, c: GRPOConfig) -> dict[str, Any]:
    # imported on use, to keep torch, safetensors, numpy out of light paths
    from r1v.model.convert import with_hf_model
    from r1v.rl.grpo import train_grpo

    res = train_grpo(with_hf_model(c), ctx.stage_dir, ctx.tracking_uri, ctx.mlflow_run_id, ctx.stage_uri)
    return {"model": str(res["model"])}
