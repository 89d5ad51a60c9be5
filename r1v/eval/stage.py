"""The `eval` stage kind: a corpus or a benchmark, generated in engine actors and graded in the driver."""

from __future__ import annotations

from typing import Any

from r1v.eval.config import EvalConfig
from r1v.workflow.runner import StageContext


def eval_stage(ctx: StageContext, c: EvalConfig) -> dict[str, Any]:
    """Generate in engine actors (`c.engine`: count, CPUs, GPUs, dtype) when Ray is up, as under `r1v run`; the
    driver reads, sends requests and grades; the actors stay a few seconds for the next eval stage, which then
    only loads its model into them. Without Ray, in this process."""
    # imported on use, to keep torch, safetensors, numpy out of light paths
    import ray

    from r1v.eval.corpus import run_eval
    from r1v.generation.warm_pool import KEEP_WARM_S
    from r1v.model.convert import with_hf_model

    res = run_eval(with_hf_model(c), ctx.stage_dir, ctx.log, actors=ray.is_initialized(), keep_warm_s=KEEP_WARM_S,
                   progress=ctx.progress)
    return {"predictions": str(res["predictions"]), "summary": str(res["summary"])}
