"""Config of the `distill` stage kind (self-distillation, METHOD.md section 4), validated at workflow load."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializeAsAny, field_validator

from r1v.config import STAGE_CONFIGS, EvalConfig, EvalEngineConfig, PreprocessConfig, SamplingConfig, Strict
from r1v.distill.judge import RewriterConfig, rewriter_config


@STAGE_CONFIGS.register("distill")
class DistillConfig(Strict):
    """The current model writes one `<think>` chain per row at the row's repetition penalty (DRLC); chains whose
    final answer the grader accepts are kept, wrong ones are rewritten by the judge and graded again; rows
    whose rewrite still misses are dropped with the reason. Runs before Stage-1 SFT and before each iterative
    SFT round."""

    model: str = Field(description="the current model (HF checkpoint or r1v manifest)")
    corpus: str = Field(description="corpus with answers; its `penalty_column` (if any) sets each row's penalty")
    judge: SerializeAsAny[Any] = Field(description="{kind: rule | openai, ...its fields}: rewrites wrong chains")
    penalty_column: str = Field("penalty", min_length=1, description="per-row repetition penalty (the DRLC "
                                "stage's output); rows without it, or null, take `default_penalty`")
    default_penalty: float = Field(1.0, gt=0)
    grader: str = Field("accuracy", description="reward/grader name (r1v.rl.rewards.REWARDS); a chain is "
                        "correct when it scores 1")
    preprocess: PreprocessConfig = PreprocessConfig()
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=512)
    engine: EvalEngineConfig = EvalEngineConfig(max_batch=256)
    chunk_rows: int = Field(1024, ge=1, description="rows generated and written together; the unit a resumed "
                            "stage skips when already done")
    seed: int = 0
    torch_threads: int | None = Field(1, ge=1, description="torch threads of each engine (see the eval stage)")
    max_dropped_fraction: float = Field(0.5, ge=0, le=1, description="fail the stage when more rows than this "
                                        "fraction are dropped (a judge that is down or misconfigured)")

    @field_validator("judge", mode="before")
    @classmethod
    def _by_kind(cls, v: Any) -> RewriterConfig:
        return rewriter_config(v)

    def eval_view(self) -> EvalConfig:
        """The eval config whose engines this stage shares (`r1v.eval.stage`)."""
        return EvalConfig(model=self.model, corpus=self.corpus, samples=1, grader=self.grader,
                          preprocess=self.preprocess, sampling=self.sampling, engine=self.engine, seed=self.seed,
                          greedy=False, torch_threads=self.torch_threads)
