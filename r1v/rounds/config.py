"""Configs of the `score`, `generate` and `select` stage kinds, validated at workflow load."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from r1v.core.config import EvalEngineConfig, PreprocessConfig, SamplingConfig, Strict, operational
from r1v.core.judges import ScorerConfig, scorer_config


class ScoreConfig(Strict):
    """Add a score column to a corpus (a new version under the stage directory; the input is never touched).

    Rows that cannot be scored are quarantined with a reason (`quarantine.parquet`), never given a default."""

    corpus: str = Field(description="input corpus (Parquet dataset directory)")
    scorer: SerializeAsAny[ScorerConfig] = Field(description="{kind: openai | local | rule, ...its fields}")
    column: str = Field("rm_score", min_length=1, description="name of the score column added")
    min_score: float = Field(0.0, description="lowest valid score (the paper's reward model: 0)")
    max_score: float = Field(5.0, description="highest valid score (the paper's reward model: 5)")
    batch_rows: int = Field(64, ge=1, description="rows handed to the scorer at a time (and the output row-group "
                            "size)")
    max_quarantined_fraction: float = Field(0.2, ge=0, le=1, description="fail the stage when more rows than "
                                            "this fraction are quarantined (a judge that is down or misconfigured)")

    @field_validator("scorer", mode="before")
    @classmethod
    def _by_kind(cls, v: Any) -> ScorerConfig:
        return scorer_config(v)

    @model_validator(mode="after")
    def _range(self) -> ScoreConfig:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score {self.min_score} must be < max_score {self.max_score}")
        return self


class GenerateConfig(Strict):
    """Answer every row of a corpus with a model (the eval stage's engines and graders) and record, per row,
    the extracted answer and whether it matched the row's `answer`: the error set E of iterative SFT."""

    model: str
    corpus: str = Field(description="corpus with answers (rows without one are quarantined: `no_answer`)")
    greedy: bool = Field(True, description="one greedy generation per row: the row's primary answer")
    samples: int = Field(0, ge=0, description="further sampled generations per row (K); with greedy off the "
                         "first sample is the primary answer")
    grader: str = Field("accuracy", description="reward/grader name (r1v.grading.rewards.REWARDS); a generation "
                        "matched when it scores 1")
    preprocess: PreprocessConfig = PreprocessConfig()
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=64)
    engine: EvalEngineConfig = EvalEngineConfig(max_batch=512)
    chunk_rows: int = Field(1024, ge=1, description="rows generated and written together; the unit a resumed "
                            "stage skips when already done")
    seed: int = 0
    torch_threads: int | None = operational(1, ge=1, description="torch threads of each engine (see the eval stage)")

    @model_validator(mode="after")
    def _something(self) -> GenerateConfig:
        if not self.greedy and self.samples == 0:
            raise ValueError("greedy is off and samples is 0: nothing would be generated")
        return self


class SelectConfig(Strict):
    """The next round's corpus: {x : score(x) >= tau} U E (E: rows the previous model got wrong), de-duplicated;
    counts by source (kept by score, added as errors, dropped) go to MLflow and `counts.json`."""

    corpus: str = Field(description="scored corpus (a `score` stage's output)")
    score_column: str = Field("rm_score", min_length=1)
    tau: float = Field(description="keep rows scoring at least this (the paper: 2, 3, 4, 5 in rounds 1-4)")
    errors: str | None = Field(None, description="a `generate` stage's corpus; its wrong rows are added")
    error_if: Literal["wrong", "any_wrong", "all_wrong"] = Field(
        "wrong", description="wrong: the primary answer is wrong (the paper); any_wrong: some generation is; "
        "all_wrong: every generation is")
    dedup_by: Literal["id", "content"] = Field("id", description="id, or content (messages, images, answer)")
