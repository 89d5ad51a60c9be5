"""Config of the `sft` stage kind (projector alignment and SFT): data, trainer, optimizer, schedule."""

from __future__ import annotations

from pydantic import Field, model_validator

from r1v.core.config import Group, OptimConfig, PreprocessConfig, Strict, TrainerConfig, operational


class SFTConfig(Strict):
    model: str
    corpus: str
    trainable: list[Group] = ["projector"]
    preprocess: PreprocessConfig = PreprocessConfig()
    trainer: TrainerConfig = TrainerConfig()
    optim: OptimConfig = OptimConfig()
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(4, ge=1, description="rows (packed sequences with packing) per worker per micro-step")
    grad_accum: int = operational(1, ge=1, description="micro-steps per optimizer step on each worker; what "
                                  "decides results is the rows per step over all workers (`fingerprint_extra`)")
    global_batch: int | None = Field(None, ge=1, description="rows (packed sequences with packing) per optimizer "
                                     "step over all workers: grad_accum becomes global_batch / "
                                     "(trainer.num_workers x batch_size), so the worker count does not change "
                                     "what a step trains on; None: grad_accum as given")
    packing: bool = Field(False, description="pack rows into token-budget sequences (no cross-sample attention)")
    max_tokens: int = Field(4096, ge=16, description="token budget of one packed sequence")
    pack_buffer: int = Field(256, ge=1, description="rows considered together when forming packed sequences, "
                             "and the window that `shuffle` shuffles on each worker")
    shuffle: bool = Field(True, description="visit the corpus in a new order every epoch, drawn from trainer.seed: "
                          "row groups permuted, then rows within each pack_buffer window")
    checkpoint_every: int = operational(10, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = operational(2, ge=1)
    log_every: int = operational(1, ge=1)
    projector_norm_reg: float = Field(0.0, ge=0, description="weight of (||projector output|| / mean "
                                      "token-embedding norm - 1)^2, averaged over image tokens, added to the loss "
                                      "(0: off): pulls image features to the scale of the LLM's token embeddings "
                                      "(r1v.train.projector_reg; a compared option, docs/world.md)")

    @model_validator(mode="after")
    def _one_batch_size(self) -> SFTConfig:
        if self.global_batch is not None and self.grad_accum != 1:
            raise ValueError("set global_batch or grad_accum, not both: global_batch derives grad_accum")
        return self

    def accumulation(self, world: int) -> int:
        """Micro-steps per optimizer step on each of `world` workers."""
        if self.global_batch is None:
            return self.grad_accum
        per = world * self.batch_size
        if self.global_batch % per:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of trainer.num_workers ({world}) "
                             f"x batch_size ({self.batch_size}) = {per}")
        return self.global_batch // per

    def fingerprint_extra(self) -> dict[str, int]:
        """The micro-batch units of one optimizer step over all workers: the worker count is operational only
        where it leaves this unchanged (always, with `global_batch`)."""
        return {"units_per_step": self.global_batch or self.batch_size * self.trainer.num_workers * self.grad_accum}
