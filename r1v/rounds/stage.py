"""The `score`, `generate` and `select` stage kinds: thin wrappers over `r1v.rounds`' modules.

Iterative SFT round t (METHOD.md section 3) in a workflow: `score` the corpus once (rm_score, 0..5); per round,
`generate` with M_{t-1} over it (E_{t-1}), `select` with tau_t, then `sft` on the selected corpus.
"""

from __future__ import annotations

from typing import Any

from r1v.rounds.config import GenerateConfig, ScoreConfig, SelectConfig
from r1v.workflow.runner import StageContext


def score_stage(ctx: StageContext, c: ScoreConfig) -> dict[str, Any]:
    """Scorers that need Ray (`local`) start their actors when Ray is up, as under `r1v run`."""
    # imported on use, to keep ray, pyarrow, numpy out of light paths
    from r1v.rounds.scoring import score_corpus

    res = score_corpus(c, ctx.stage_dir, ctx.log)
    return {"corpus": str(res["corpus"]), "quarantine": str(res["quarantine"]), "summary": str(res["summary"])}


def generate_stage(ctx: StageContext, c: GenerateConfig) -> dict[str, Any]:
    """Engines in Ray actors when Ray is up (kept warm a few seconds for a following eval or generate stage),
    else in this process; an InternVL-chat checkpoint is converted once, here, before any actor loads it."""
    # imported on use, to keep torch, ray, pyarrow out of light paths
    import ray

    from r1v.generation.warm_pool import KEEP_WARM_S
    from r1v.model.convert import with_hf_model
    from r1v.rounds.generate import run_generate

    c = with_hf_model(c)
    res = run_generate(c, ctx.stage_dir, ctx.log, actors=ray.is_initialized(), keep_warm_s=KEEP_WARM_S,
                       progress=ctx.progress)
    return {k: str(res[k]) for k in ("corpus", "samples", "quarantine", "summary")}


def select_stage(ctx: StageContext, c: SelectConfig) -> dict[str, Any]:
    # imported on use, to keep ray, pyarrow, numpy out of light paths
    from r1v.rounds.select import run_select

    res = run_select(c, ctx.stage_dir, ctx.log)
    return {k: str(res[k]) for k in ("corpus", "counts", "quarantine")}
