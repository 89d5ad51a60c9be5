"""The `distill` stage kind: a thin wrapper over `r1v.distill.distill` (self-distillation, METHOD.md section 4).

In a workflow it runs before Stage-1 SFT (on the SFT corpus, with the reassembled model) and before each
iterative SFT round (with that round's previous model); the following `sft` stage trains on its `corpus`.
"""

from __future__ import annotations

from typing import Any

from r1v.distill.distill_config import DistillConfig
from r1v.workflow import STAGES, StageContext


@STAGES.register("distill")
def distill_stage(ctx: StageContext, c: DistillConfig) -> dict[str, Any]:
    """Engines in Ray actors when Ray is up (kept warm a few seconds for a following stage), else in this
    process; an InternVL-chat checkpoint is converted once, here, before any actor loads it."""
    import ray

    from r1v.distill.distill import run_distill
    from r1v.eval.actors import KEEP_WARM_S
    from r1v.model.convert import hf_view

    if ctx.attempt > 1:
        ctx.event("resuming", attempt=ctx.attempt)
    c = c.model_copy(update={"model": str(hf_view(c.model))})
    res = run_distill(c, ctx.stage_dir, ctx.log, actors=ray.is_initialized(), keep_warm_s=KEEP_WARM_S)
    return {"corpus": str(res["corpus"]), "dropped": str(res["dropped_file"]), "summary": str(res["summary"])}
