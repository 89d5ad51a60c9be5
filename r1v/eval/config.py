"""Config of the `eval` stage kind, and its workflow-wide check: each results-table row has one eval stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from r1v.core.config import ConfigError, EvalEngineConfig, PreprocessConfig, SamplingConfig, Strict, operational


class EvalConfig(Strict):
    model: str
    corpus: str | None = Field(None, description="r1v corpus with answers (e.g. the synthetic test split)")
    benchmark: str | None = Field(None, description="a benchmark name instead of a corpus (see r1v eval)")
    data_root: str | None = Field(None, description="benchmark data folder (default: $R1V_BENCHMARKS or "
                                  "../shared/data/benchmarks)")
    dataset: str | None = Field(None, description="official Parquet release (MathVista, MMMU images)")
    samples: int = Field(4, ge=1, description="samples per item; pass@1 is their mean")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N items")
    grader: str = Field("accuracy", description="reward/grader name used for a corpus")
    preprocess: PreprocessConfig = PreprocessConfig()
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=64)
    engine: EvalEngineConfig = EvalEngineConfig(max_batch=512)  # big batches: eval keeps no logits (r1v.eval.corpus)
    seed: int = 0
    mode: Literal["vlm", "no_image", "shuffled_image", "text"] = Field(
        "vlm", description="vlm: the corpus as is; no_image: every tile blanked (uint8 zeros, same count), so the "
        "answer cannot come from the image; shuffled_image: each item shown another item's image (same tile "
        "count, seeded), an in-distribution image that does not answer it; text: `model` is a causal LM asked "
        "meta.text_question (corpus only)")
    greedy: bool = Field(True, description="one greedy generation per item gives `accuracy` (corpus only); the "
                         "`samples` sampled ones give pass_at_1")
    torch_threads: int | None = operational(1, ge=1, description="torch threads of each engine (None: "
                                            "engine.num_cpus in an actor, at least 1; every CPU it may use "
                                            "in-process); 1 is fastest for tiny models and robust on busy CPUs")
    report_stage: str | None = Field(None, description="the results-table row this eval fills: the name of the "
                                     "stage whose model it evaluates")
    report_baseline: str | None = Field(None, description="the results-table baseline this eval fills "
                                        "(no_image, substitute_vlm, text_reasoning, text_instruct, ...)")

    @model_validator(mode="after")
    def _check_roles(self) -> EvalConfig:
        if self.report_stage and self.report_baseline:
            raise ValueError("set at most one of report_stage and report_baseline")
        if self.mode != "vlm" and self.corpus is None:
            raise ValueError(f"mode {self.mode!r} needs a corpus (benchmarks are evaluated in vlm mode)")
        return self


def check_report_roles(stages: dict[str, Any], stage_configs: dict[str, BaseModel], source: str) -> None:
    """Each results-table row is filled by at most one eval stage, and a reported stage exists."""
    seen: dict[tuple[str, str], str] = {}
    for name, c in stage_configs.items():
        if not isinstance(c, EvalConfig):
            continue
        if c.report_stage and c.report_stage not in stages:
            raise ConfigError(f"{source}: stages.{name}.config.report_stage: unknown stage {c.report_stage!r}")
        role = ("report_stage", c.report_stage) if c.report_stage else ("report_baseline", c.report_baseline)
        if role[1] is None:
            continue
        if role in seen:
            raise ConfigError(f"{source}: stages.{name}.config.{role[0]}: {role[1]!r} is already reported by "
                              f"stage {seen[role]!r}")
        seen[role] = name
