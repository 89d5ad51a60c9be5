"""Configs of the distillation stage kinds: `distill.score` (QDAM, VTIA and DRLC of METHOD.md section 4) and
`distill` (self-distillation), validated at workflow load."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from r1v.core.config import (
    EvalEngineConfig,
    PenaltyScope,
    PreprocessConfig,
    SamplingConfig,
    Strict,
    operational,
)
from r1v.core.judges import RewriterConfig, ScorerConfig, rewriter_config, scorer_config

_REPLY = "\n\nReply with the score only, as: Score: N"
DEFAULT_PROMPTS = {
    "vision": "Rate the attached image from 0 to 5 for clarity (sharp, legible, well framed) and for how necessary "
              "it is to answer the question (0: the text alone suffices or the image is unreadable; 5: the "
              "question cannot be answered without a close look at it).\n\nQuestion:\n{question}" + _REPLY,
    "text": "Rate the question from 0 to 5 for quality (well posed, unambiguous), difficulty and reasoning demand "
            "(0: trivial lookup or ill-posed; 5: a hard, well-posed multi-step problem).\n\nQuestion:\n{question}"
            + _REPLY,
    "integration": "Rate from 0 to 5 how tightly answering the question integrates the image with the text "
                   "(0: plain what/where identification of one thing; 5: causal why/how reasoning over several "
                   "objects, their spatial relations and domain knowledge).\n\nQuestion:\n{question}" + _REPLY,
}
"""Question-rating prompts given to an `openai` judge whose config names no `prompt` (its default rates a
response, which is not what QDAM/VTIA ask)."""


@dataclass(frozen=True)
class ImageCueParams:
    """Reference points of the image cues (each maps a raw measure to [0, 1])."""

    blur_ref: float = 100.0
    """Laplacian variance scoring 0.5 (score = v / (v + blur_ref)); 100 is the usual blur-detection threshold."""
    target_side: float = 448.0
    """sqrt(width * height) from which resolution scores 1 (InternVL's tile side); below, linear."""
    aspect_ok: float = 0.25
    """short/long side ratio from which aspect scores 1 (4:1 is still readable); below, linear."""
    w_blur: float = 0.5
    w_res: float = 0.3
    w_aspect: float = 0.2


@dataclass(frozen=True)
class TextCueParams:
    """Reference points of the question cues (S_t) and integration cues (S_I)."""

    length_ref: float = 60.0
    """words from which length scores 1"""
    ops_ref: float = 4.0
    """operators from which the operator cue scores 1"""
    reason_ref: float = 3.0
    """reasoning-demand keywords from which that cue scores 1"""
    w_length: float = 0.4
    w_ops: float = 0.4
    w_reason: float = 0.2
    spatial_ref: float = 2.0
    """spatial relations (with at least two objects) from which the spatial cue scores 1"""
    domain_ref: float = 3.0
    """distinct domain terms from which the domain cue scores 1 (co-occurrence: one term alone scores 1/3)"""
    w_causal: float = 0.4
    w_spatial: float = 0.3
    w_domain: float = 0.3
    w_what_where: float = 0.2
    """subtracted for a plain what/where/which/who identification question (clipped at 0)"""


class JudgeConfig(Strict):
    """A judge part of one score: a scorer of the registry rating each row in [min_score, max_score],
    mapped to [0, 1] and mixed with the cue part: score = (1 - weight) * cue + weight * judge."""

    scorer: SerializeAsAny[ScorerConfig] = Field(description="{kind: openai | local | rule, ...its fields}")
    min_score: float = 0.0
    max_score: float = 5.0
    weight: float = Field(0.5, ge=0, le=1, description="share of the judge in the score (the cues get the rest)")

    @field_validator("scorer", mode="before")
    @classmethod
    def _by_kind(cls, v: Any) -> ScorerConfig:
        return scorer_config(v)

    @model_validator(mode="after")
    def _range(self) -> JudgeConfig:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score {self.min_score} must be < max_score {self.max_score}")
        return self


def _with_default_prompt(v: Any, which: str) -> Any:
    if isinstance(v, dict) and isinstance(v.get("scorer"), dict) and v["scorer"].get("kind") == "openai":
        s = dict(v["scorer"])
        s.setdefault("prompt", DEFAULT_PROMPTS[which])
        if which == "vision":
            s.setdefault("images", True)
        return {**v, "scorer": s}
    return v


class ImageCueConfig(Strict):
    """Reference points and weights of the image cues (`r1v.distill.cues.ImageCueParams`)."""

    blur_ref: float = Field(ImageCueParams.blur_ref, gt=0, description="Laplacian variance scoring 0.5")
    target_side: float = Field(ImageCueParams.target_side, gt=0, description="sqrt(w*h) from which res is 1")
    aspect_ok: float = Field(ImageCueParams.aspect_ok, gt=0, le=1, description="short/long from which aspect is 1")
    w_blur: float = Field(ImageCueParams.w_blur, ge=0)
    w_res: float = Field(ImageCueParams.w_res, ge=0)
    w_aspect: float = Field(ImageCueParams.w_aspect, ge=0)

    @model_validator(mode="after")
    def _weights(self) -> ImageCueConfig:
        if self.w_blur + self.w_res + self.w_aspect <= 0:
            raise ValueError("w_blur + w_res + w_aspect must be > 0")
        return self

    def params(self) -> ImageCueParams:
        return ImageCueParams(**self.model_dump())


class TextCueConfig(Strict):
    """Reference points and weights of the question (S_t) and integration (S_I) cues."""

    length_ref: float = Field(TextCueParams.length_ref, gt=0)
    ops_ref: float = Field(TextCueParams.ops_ref, gt=0)
    reason_ref: float = Field(TextCueParams.reason_ref, gt=0)
    w_length: float = Field(TextCueParams.w_length, ge=0)
    w_ops: float = Field(TextCueParams.w_ops, ge=0)
    w_reason: float = Field(TextCueParams.w_reason, ge=0)
    spatial_ref: float = Field(TextCueParams.spatial_ref, gt=0)
    domain_ref: float = Field(TextCueParams.domain_ref, gt=0)
    w_causal: float = Field(TextCueParams.w_causal, ge=0)
    w_spatial: float = Field(TextCueParams.w_spatial, ge=0)
    w_domain: float = Field(TextCueParams.w_domain, ge=0)
    w_what_where: float = Field(TextCueParams.w_what_where, ge=0)

    @model_validator(mode="after")
    def _weights(self) -> TextCueConfig:
        if self.w_length + self.w_ops + self.w_reason <= 0:
            raise ValueError("w_length + w_ops + w_reason must be > 0")
        if self.w_causal + self.w_spatial + self.w_domain <= 0:
            raise ValueError("w_causal + w_spatial + w_domain must be > 0")
        return self

    def params(self) -> TextCueParams:
        return TextCueParams(**self.model_dump())


class DistillScoreConfig(Strict):
    """Add S_v, S_t, S_I (with their components) and the DRLC repetition penalty to a corpus (a new version under
    the stage directory). Without a judge a score is its cue part alone. Rows whose image cannot be decoded or
    whose judge gives no valid score are quarantined with the reason, never given a default."""

    corpus: str = Field(description="input corpus (Parquet dataset directory)")
    vision_judge: JudgeConfig | None = Field(None, description="judge of S_v (image clarity and necessity)")
    text_judge: JudgeConfig | None = Field(None, description="judge of S_t (question quality, difficulty)")
    integration_judge: JudgeConfig | None = Field(None, description="judge of S_I (vision-text integration)")
    image_cues: ImageCueConfig = ImageCueConfig()
    text_cues: TextCueConfig = TextCueConfig()
    alpha: float = Field(math.log(2), ge=0, description="DRLC alpha (not given by the paper); ln 2 maps the "
                         "scores onto penalties [1, 2] without reaching the cap early")
    beta: float = Field(1.0, ge=0, description="DRLC weight of S_t (not given by the paper)")
    gamma: float = Field(1.0, ge=0, description="DRLC weight of S_I (not given by the paper)")
    batch_rows: int = Field(64, ge=1, description="rows handed to the judges at a time")
    max_quarantined_fraction: float = Field(0.2, ge=0, le=1, description="fail the stage when more rows than "
                                            "this fraction are quarantined")

    @field_validator("vision_judge", mode="before")
    @classmethod
    def _vision_prompt(cls, v: Any) -> Any:
        return _with_default_prompt(v, "vision")

    @field_validator("text_judge", mode="before")
    @classmethod
    def _text_prompt(cls, v: Any) -> Any:
        return _with_default_prompt(v, "text")

    @field_validator("integration_judge", mode="before")
    @classmethod
    def _integration_prompt(cls, v: Any) -> Any:
        return _with_default_prompt(v, "integration")


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
    penalty_scope: PenaltyScope = Field(
        "prompt_and_generated", description="the tokens each row's penalty damps (`SamplingConfig."
        "repetition_penalty_scope`, which it replaces here): `prompt_and_generated`, the default of transformers "
        "and vLLM and so presumably the paper's DRLC, also penalises the prompt's tokens, the chat template's "
        "newline and end-of-turn included, so closing a chain is damped from its first token; `generated` counts "
        "the chain's own tokens only")
    grader: str = Field("accuracy", description="reward/grader name (r1v.grading.rewards.REWARDS); a chain is "
                        "correct when it scores 1")
    preprocess: PreprocessConfig = PreprocessConfig()
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=512)
    engine: EvalEngineConfig = EvalEngineConfig(max_batch=256)
    chunk_rows: int = Field(1024, ge=1, description="rows generated and written together; the unit a resumed "
                            "stage skips when already done")
    seed: int = 0
    torch_threads: int | None = operational(1, ge=1, description="torch threads of each engine (see the eval stage)")
    max_dropped_fraction: float = Field(0.5, ge=0, le=1, description="fail the stage when more rows than this "
                                        "fraction are dropped (a judge that is down or misconfigured)")

    @field_validator("judge", mode="before")
    @classmethod
    def _by_kind(cls, v: Any) -> RewriterConfig:
        return rewriter_config(v)

    @model_validator(mode="after")
    def _one_scope(self) -> DistillConfig:
        if "repetition_penalty_scope" in self.sampling.model_fields_set \
                and self.sampling.repetition_penalty_scope != self.penalty_scope:
            raise ValueError("sampling.repetition_penalty_scope: the rows' penalties take the stage's "
                             "penalty_scope; set penalty_scope instead")
        # The two kept equal, so that the config's dump (what a stage's worker or a resumed run validates again)
        # does not read as two conflicting settings. Not by assignment: that would validate this model again.
        if self.sampling.repetition_penalty_scope != self.penalty_scope:
            object.__setattr__(self, "sampling", self.sampling.model_copy(
                update={"repetition_penalty_scope": self.penalty_scope}))
        return self

    def sampling_dict(self) -> dict[str, Any]:
        """The engines' sampling: `sampling` with `penalty_scope` (each row's penalty is its request's own)."""
        return {**self.sampling.model_dump(), "repetition_penalty_scope": self.penalty_scope}
