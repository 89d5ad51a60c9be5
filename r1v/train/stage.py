"""The `sft` stage kind: projector alignment and supervised fine-tuning in Ray Train workers."""

from __future__ import annotations

from typing import Any

from r1v.train.config import SFTConfig
from r1v.workflow.runner import StageContext


def sft_stage(ctx: StageContext, c: SFTConfig) -> dict[str, Any]:
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    from r1v.model.convert import with_hf_model
    from r1v.train.sft import train_sft

    res = train_sft(with_hf_model(c), ctx.stage_dir, ctx.tracking_uri, ctx.mlflow_run_id, ctx.stage_uri)
    for cnt in res["counts"]:
        ctx.log.dict(cnt, f"counts/epoch-{cnt['epoch']}.json")
    quarantine = ctx.stage_dir / "quarantine"
    quarantine.mkdir(exist_ok=True)
    return {"model": str(res["model"]), "quarantine": str(quarantine)}
