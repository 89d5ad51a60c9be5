"""The distillation stage kinds (AL-CoTD, METHOD.md section 4).

`distill.score` runs once over the distillation corpus (QDAM, VTIA and the DRLC penalty column, `r1v.distill.quality`);
`distill` (self-distillation, `r1v.distill.distill`) runs before Stage-1 SFT (on the SFT corpus, with the reassembled
model) and before each iterative SFT round (with that round's previous model); the following `sft` stage trains on
its `corpus`.
"""

from __future__ import annotations

from typing import Any

from r1v.distill.config import DistillConfig, DistillScoreConfig
from r1v.workflow.runner import StageContext


def distill_score_stage(ctx: StageContext, c: DistillScoreConfig) -> dict[str, Any]:
    """Judges that need Ray (`local`) start their actors when Ray is up, as under `r1v run`."""
    # imported on use, to keep ray, pyarrow, PIL out of light paths
    from r1v.distill.quality import score_quality

    res = score_quality(c, ctx.stage_dir, ctx.log)
    return {"corpus": str(res["corpus"]), "quarantine": str(res["quarantine"]), "summary": str(res["summary"])}


def distill_stage(ctx: StageContext, c: DistillConfig) -> dict[str, Any]:
    """Engines in Ray actors when Ray is up (kept warm a few seconds for a following stage), else in this
    process; an InternVL-chat checkpoint is converted once, here, before any actor loads it."""
    # imported on use, to keep torch, ray, pyarrow out of light paths
    import ray

    from r1v.distill.distill import run_distill
    from r1v.generation.warm_pool import KEEP_WARM_S
    from r1v.model.convert import with_hf_model

    c = with_hf_model(c)
    res = run_distill(c, ctx.stage_dir, ctx.log, actors=ray.is_initialized(), keep_warm_s=KEEP_WARM_S)
    return {"corpus": str(res["corpus"]), "dropped": str(res["dropped_file"]), "summary": str(res["summary"])}
