"""The `grpo` stage's config: batch sizes, the variants by registry name, dynamic sampling and the replay buffer."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from r1v.core.config import (
    EngineConfig,
    Group,
    OptimConfig,
    PreprocessConfig,
    SamplingConfig,
    Strict,
    TrainerConfig,
    operational,
)
from r1v.core.registry import resolve

ALGOS = {"advantage": "r1v.rl.algos:ADVANTAGES", "loss_agg": "r1v.rl.algos:LOSS_AGG",
         "policy_loss": "r1v.rl.algos:POLICY_LOSSES", "kl_estimator": "r1v.rl.algos:KL_ESTIMATORS"}
"""The registries that name GRPO's algorithm parts (`r1v.rl.algos`, torch-free at import)."""


class DynamicSamplingConfig(Strict):
    """DAPO's dynamic sampling: groups whose rewards are all equal (zero advantage: no signal) are dropped and
    more prompts are rolled out until the batch is full again, at most `max_rounds` rollouts per step; a batch
    still short after that is topped up with dropped groups that carry no loss weight."""

    enabled: bool = False
    max_rounds: int = Field(3, ge=1, description="rollout rounds per step, the first included")


class ReplayConfig(Strict):
    """R1V2's Selective Sample Buffer: samples with non-zero advantage are kept (newest `capacity`), and when
    a batch has zero-advantage groups, buffered samples drawn with probability proportional to |advantage|
    take their place (up to `max_fraction` of the batch)."""

    enabled: bool = False
    capacity: int = Field(512, ge=1)
    max_fraction: float = Field(0.5, gt=0, le=1, description="at most this fraction of a batch's samples replayed")


class GRPOConfig(Strict):
    model: str
    corpus: str
    trainable: list[Group] = ["projector"]
    preprocess: PreprocessConfig = PreprocessConfig()
    trainer: TrainerConfig = TrainerConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6, warmup_ratio=0.0, min_lr_ratio=1.0, weight_decay=0.0)
    steps: int = Field(10, ge=1)
    prompts_per_step: int = Field(2, ge=1, description="prompts per worker per step")
    shuffle: bool = Field(True, description="each pass over a worker's prompts in a new order drawn from "
                          "trainer.seed (else file order)")
    group_size: int = Field(8, ge=2, description="samples per prompt (the GRPO group)")
    ppo_epochs: int = Field(1, ge=1)
    ppo_mini_batch: int | None = Field(None, ge=1, description="samples per optimizer step on a rank (a PPO "
                                       "mini-batch); None: the whole rollout batch, one step per epoch")
    micro_batch: int | None = Field(None, ge=1, description="samples per forward (gradient accumulation over a "
                                    "mini-batch); None: the whole mini-batch at once")
    logprob_chunk: int = Field(4096, ge=1, description="response tokens per lm_head call when computing "
                               "log-probs: bounds the logits held at once to chunk x vocab")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range; clip_eps_low / clip_eps_high override a side")
    clip_eps_low: float | None = Field(None, gt=0, description="lower clip: ratio >= 1 - clip_eps_low")
    clip_eps_high: float | None = Field(None, gt=0, description="upper clip: ratio <= 1 + clip_eps_high (DAPO's "
                                        "clip-higher: larger than the lower one, e.g. 0.28)")
    dual_clip_c: float | None = Field(None, gt=1, description="dual clip: the loss of a negative-advantage token "
                                      "is bounded by c * |A| (e.g. 3.0); None: off")
    loss_agg: str = Field("token_mean", description="loss aggregation (r1v.rl.algos.LOSS_AGG): token_mean, "
                          "seq_mean_token_mean, seq_mean_token_sum")
    tis_cap: float | None = Field(None, gt=0, description="truncated importance sampling against the rollout "
                                  "engine's log-probs: per-token weight min(pi_old / pi_rollout, cap); None: off")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL term against the reference; 0 turns it off")
    kl_estimator: str = "k3"
    advantage: str = Field("grpo", description="advantage estimator (r1v.rl.algos.ADVANTAGES): grpo, dr_grpo")
    policy_loss: str = "clipped_surrogate"
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    replay: ReplayConfig = ReplayConfig()
    rewards: dict[str, float] = {"accuracy": 1.0, "format": 0.5}
    reward_modules: list[str] = Field([], description="modules imported on every worker before scoring: "
                                      "they register custom rewards with @REWARDS.register")
    max_reward_failure_fraction: float = Field(
        0.1, ge=0, le=1, description="a reward that fails (raises, returns NaN / a non-number, or times out) on "
        "more than this fraction of the samples generated in one step, over all workers and rollout rounds, fails "
        "the stage naming the reward and its first error (failed samples score 0 below it). Per step, not "
        "cumulative: a grader broken from some step on is caught at that step. 1: never fail")
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineConfig = EngineConfig()
    checkpoint_every: int = operational(5, ge=1)
    keep_checkpoints: int = operational(2, ge=1)
    sample_log_every: int = operational(5, ge=1, description="steps between logging sample generations")

    @field_validator("rewards")
    @classmethod
    def _nonempty(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one reward is needed")
        return v

    @field_validator("advantage", "loss_agg", "policy_loss", "kl_estimator")
    @classmethod
    def _registered(cls, v: str, info: Any) -> str:
        registry = resolve(ALGOS[info.field_name])
        if v not in registry:
            raise ValueError(f"unknown {registry.what} {v!r}; known: {', '.join(registry.names())}")
        return v

    @model_validator(mode="after")
    def _clip_sides(self) -> GRPOConfig:
        # resolved here so a dumped config (and its fingerprint) names the clip range used
        for side in ("clip_eps_low", "clip_eps_high"):
            if getattr(self, side) is None:
                self.__dict__[side] = self.clip_eps
        return self

    def fingerprint_extra(self) -> dict[str, int]:
        """Prompts per step over all workers: the worker count is operational only where it leaves this
        unchanged."""
        return {"prompts_per_step_all_workers": self.prompts_per_step * self.trainer.num_workers}

    def batch_sizes(self, n: int) -> tuple[int, int]:
        """(samples per optimizer step, samples per forward) for a rollout batch of `n` samples on a rank."""
        mini = self.ppo_mini_batch or n
        return mini, min(self.micro_batch or mini, mini)

    @model_validator(mode="after")
    def _batch_sizes_divide(self) -> GRPOConfig:
        n = self.prompts_per_step * self.group_size
        mini = self.ppo_mini_batch or n
        if n % mini:
            raise ValueError(f"ppo_mini_batch {mini} must divide the rollout batch prompts_per_step x group_size = "
                             f"{n} (every rank runs the same number of optimizer steps)")
        if self.micro_batch is not None and mini % min(self.micro_batch, mini):
            raise ValueError(f"micro_batch {self.micro_batch} must divide ppo_mini_batch {mini}")
        return self

    @model_validator(mode="after")
    def _kl_needs_frozen_backbones(self) -> GRPOConfig:
        # The KL reference is the frozen vision tower and LLM plus a copy of the starting projector: it is only
        # the starting policy while the backbones do not train. No frozen copy of a trained backbone is kept.
        moving = sorted(set(self.trainable) - {"projector"})
        if self.kl_coef > 0 and moving:
            raise ValueError(f"kl_coef {self.kl_coef} > 0 with trainable {moving}: the KL reference keeps only the "
                             "starting projector and shares the backbones with the policy, so it would drift "
                             "with them; set kl_coef: 0 or train the projector only")
        return self
