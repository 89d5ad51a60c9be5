"""Configs of the miniature world's stage kinds (`data.world`, `model.world`), validated at workflow load."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from r1v.core.config import Strict


class SftNoiseConfig(Strict):
    """Fractions of the SFT rows whose chain is flawed, per kind (`r1v.world.corpora.FLAWS`); disjoint rows.

    Why: the world's reference chains are all right, so a reward model (or the `rule` scorer) grades every row 5
    and iterative SFT's thresholds select nothing out; the paper's teacher data has flaws of varying quality."""

    wrong_answer: float = Field(0.0, ge=0, le=1, description="a slipped step carried to a wrong final answer")
    no_think_end: float = Field(0.0, ge=0, le=1, description="no `</think>` before the answer")
    no_box: float = Field(0.0, ge=0, le=1, description="the final answer not in `\\boxed{}`")
    overlong: float = Field(0.0, ge=0, le=1, description="the reasoning restated until several times its length")
    truncated: float = Field(0.0, ge=0, le=1, description="the chain cut off midway: no `</think>`, no answer")

    @model_validator(mode="after")
    def _at_most_all(self) -> SftNoiseConfig:
        total = sum(self.model_dump().values())
        if total > 1 + 1e-9:
            raise ValueError(f"the fractions sum to {total:g} > 1")
        return self


class OverthinkConfig(Strict):
    """Redundant `Check:` restatements in reasoning chains, more on easy items (`r1v.world.domain.overthought_chain`).

    Why: the world's reference chains hold exactly the steps a problem needs, so a repetition penalty (AL-CoTD's
    DRLC) has nothing redundant to cut; real reasoning models re-verify steps they have just written, most on
    items that need it least."""

    share: dict[int, float] = Field(default_factory=lambda: {1: 0.7, 2: 0.5, 3: 0.3},
                                    description="per level (1-3), the share of chains that carry checks; "
                                                "levels left out carry none")
    min_checks: int = Field(1, ge=1, description="checks in a chain that carries any, at least")
    max_checks: int = Field(3, ge=1, description="and at most (drawn uniformly in between)")

    @model_validator(mode="after")
    def _valid(self) -> OverthinkConfig:
        if not set(self.share) <= {1, 2, 3}:
            raise ValueError(f"share: levels are 1, 2, 3; got {sorted(self.share)}")
        if not all(0 <= v <= 1 for v in self.share.values()):
            raise ValueError(f"share: each level's share is in [0, 1]; got {self.share}")
        if self.min_checks > self.max_checks:
            raise ValueError(f"min_checks {self.min_checks} > max_checks {self.max_checks}")
        return self


class ClarityConfig(Strict):
    """Images of varying clarity: each rendered image blurred by a Gaussian radius drawn uniformly from `blur`
    (0: as rendered), in every corpus (the projector's alignment rows too, so it learns to read them all).

    Why: the world's images are otherwise equally sharp, equally large and square, so the image cue of QDAM
    (`r1v.distill.cues.image_cues`: Laplacian variance, resolution, aspect) varies only with the render noise
    and carries nothing about the item; with clarity varying, a low cue marks an image that is hard to read."""

    blur: list[float] = Field(default_factory=lambda: [0.0, 0.6, 1.2],
                              description="Gaussian blur radii in pixels (of the 56-pixel tile), drawn "
                                          "uniformly per image; 0 leaves the image as rendered")

    @model_validator(mode="after")
    def _valid(self) -> ClarityConfig:
        if not self.blur or any(not 0 <= r <= 8 for r in self.blur):
            raise ValueError(f"blur: one or more radii in [0, 8] pixels; got {self.blur}")
        return self


class WorldDataConfig(Strict):
    """Render the run's corpora: alignment (perception only), SFT (multimodal chains of thought), GRPO
    prompts, and the held-out test (digit tuples that never appear in any training data)."""

    n_align: int = Field(2000, ge=1, description="perception-only rows for projector alignment")
    n_sft: int = Field(1000, ge=1, description="image problems with reasoning chains for projector SFT")
    n_grpo: int = Field(1000, ge=1, description="image problems (answers only) for GRPO")
    n_test: int = Field(1000, ge=1, description="held-out image problems, levels 1-3 balanced")
    seed: int = 0
    corrupt_rows: int = Field(0, ge=0, description="alignment rows with truncated images (they must be "
                                                   "quarantined, not trained on)")
    sft_noise: SftNoiseConfig | None = Field(None, description="flawed SFT chains, by kind (default: none)")
    overthink: OverthinkConfig | None = Field(None, description="redundant checks in the SFT chains, as the "
                                                                "reasoning LLM was built with (default: none)")
    clarity: ClarityConfig | None = Field(None, description="images blurred to varying degrees, so that the "
                                                            "image cue carries information (default: all as "
                                                            "rendered)")

    @model_serializer(mode="wrap")
    def _omit_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without noise, overthinking or clarity the dump, hence the stage's fingerprint, is what it was before the
        options existed."""
        out = handler(self)
        for key in ("sft_noise", "overthink", "clarity"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class WorldModelConfig(Strict):
    """The substitute VLM of the recipe: the world's pretrained vision tower, a fresh R1V projector
    (LayerNorm -> Linear -> GELU -> Linear) and the world's instruct LLM; plus the reasoning LLM to re-assemble
    onto later."""

    world: str | None = Field(None, description="a built world directory (default: the one shipped in r1v)")
    seed: int = Field(0, description="projector initialisation")
