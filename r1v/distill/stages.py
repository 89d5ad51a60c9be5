"""The `distill.score` stage kind: a thin wrapper over `r1v.distill.quality`.

In the AL-CoTD loop (METHOD.md section 4) it runs once over the distillation corpus; its `penalty` column is
the per-request repetition penalty of the `distill` generation stage.
"""

from __future__ import annotations

from typing import Any

from r1v.distill.config import DistillScoreConfig
from r1v.workflow import STAGES, StageContext


@STAGES.register("distill.score")
def distill_score_stage(ctx: StageContext, c: DistillScoreConfig) -> dict[str, Any]:
    """Judges that need Ray (`local`) start their actors when Ray is up, as under `r1v run`."""
    from r1v.distill.quality import score_corpus

    if ctx.attempt > 1:
        ctx.event("resuming", attempt=ctx.attempt)
    res = score_corpus(c, ctx.stage_dir, ctx.log)
    return {"corpus": str(res["corpus"]), "quarantine": str(res["quarantine"]), "summary": str(res["summary"])}
