"""The base of every config: strict pydantic models, the config error, and the config parts that several stage
kinds share (trainer, optimizer, sampling, engines, preprocessing, tracking, Ray).

Why strict: a misspelt or ill-typed key fails when the workflow is loaded, naming the file and the dotted key, not
an hour into a run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _partial_mappings_extend_own_defaults(cls, data: Any) -> Any:
        """A partial mapping for a nested config extends *this field's* default, not the nested class's: GRPO's
        `optim: {lr: ...}` keeps GRPO's optimizer defaults (no weight decay, a constant rate), not OptimConfig's."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if not isinstance(value, dict) or field.default_factory is not None:
                continue
            default = field.default
            if isinstance(default, BaseModel):
                out[name] = _deep_merge(default.model_dump(exclude_unset=True), value)
        return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


OPERATIONAL = "r1v_operational"


def operational(default: Any, **kw: Any) -> Any:
    """A field that changes how a stage runs, not what it produces (logging, checkpoint cadence, threads, worker
    and engine counts): left out of the stage's fingerprint, so changing it on resume re-runs nothing."""
    return Field(default, json_schema_extra={OPERATIONAL: True}, **kw)


def is_operational(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(OPERATIONAL))


# --------------------------------------------------------------------------- shared parts


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="MLflow URI; default sqlite:///<run_root>/mlflow.db")
    experiment: str = "r1v"


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray address; None starts (or joins via RAY_ADDRESS) a local one")
    num_cpus: int | None = None


class PreprocessConfig(Strict):
    """How corpus rows become model inputs (tiling, tokenisation)."""

    max_tiles: int = Field(6, ge=1, le=40)
    use_thumbnail: bool = True
    max_length: int = Field(1024, ge=16)
    system_prompt: str | None = None


class TrainerConfig(Strict):
    """Ray Train + DeepSpeed settings shared by the SFT and GRPO stages."""

    num_workers: int = operational(2, ge=1)
    cpus_per_worker: float = operational(0.5, gt=0, description="0.5 on 2-core machines: Ray Data needs a CPU too")
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3
    param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3 keeps parameters with fewer elements than this gathered on every rank "
        "(DeepSpeed's default); 0 re-gathers every parameter in every forward")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="engine dtype; None: bfloat16 with use_gpu (DeepSpeed keeps fp32 master weights of the "
        "trainable parameters), float32 without")
    torch_threads: int = operational(1, ge=1)
    activation_checkpointing: bool = Field(False, description="recompute the LLM's activations in backward "
                                           "(less memory, ~1/3 more compute)")
    seed: int = 0
    max_failures: int = operational(1, ge=-1, description="worker-group failures (a dead worker, a lost node) "
                                    "that Ray Train recovers from by itself, restarting the workers from the "
                                    "latest checkpoint; -1: no limit, 0: fail at once. Errors the same inputs "
                                    "would raise again (divergence, a broken reward) are never retried")
    max_nonfinite_steps: int = Field(
        3, ge=0, description="optimizer steps whose loss or global gradient norm is NaN/inf (on any rank) are "
        "skipped: parameters, optimizer state and LR schedule stay as they were and the step is counted "
        "(`nonfinite_steps` metric); once more than this many were skipped since the stage (re)started, it fails "
        "naming the step and what was not finite. A few stray ones (one bad batch, a transient overflow) are "
        "survivable; more point at divergence or broken data. 0: fail on the first")

    @model_validator(mode="after")
    def _default_dtype(self) -> TrainerConfig:
        if self.dtype is None:  # resolved here, so a dumped config (and its fingerprint) names the dtype used
            self.__dict__["dtype"] = "bfloat16" if self.use_gpu else "float32"
        return self


class OptimConfig(Strict):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0)


PenaltyScope = Literal["prompt_and_generated", "generated"]
"""Which tokens a repetition penalty counts as already seen (`SamplingConfig.repetition_penalty_scope`)."""


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    repetition_penalty_scope: PenaltyScope = Field(
        "prompt_and_generated", description="the tokens `repetition_penalty` damps: `prompt_and_generated` (the "
        "default of transformers and vLLM) every token of the prompt (chat template included) and of the "
        "completion so far; `generated` only the tokens this completion generated so far, so that the template's "
        "newline and end-of-turn token are not penalised from the first token")


class VLLMOptions(Strict):
    """Settings of the `vllm` engine (`r1v.generation.engine_vllm`); the transformers engine ignores them."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; the actor's num_gpus must equal it")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="vLLM's share of each GPU (the vision "
                                          "tower and projector are held beside it, in torch)")
    max_model_len: int | None = Field(None, ge=1, description="None: the model config's")
    kv_cache_gb: float = Field(1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU (compiling costs ~40 s a start), "
                                       "CUDA graphs on GPU")


class EngineConfig(Strict):
    kind: str = Field("transformers", description="rollout engine (`r1v.generation.engines.ENGINES`): transformers "
                      "(CPU/GPU) or vllm (vLLM on GPU, vllm-cpu on CPU)")
    num_engines: int = operational(1, ge=1)
    num_cpus: float = operational(0.0, ge=0, description="0 so that engines never starve the trainer of CPUs")
    num_gpus: float = Field(0.0, ge=0)
    max_batch: int = Field(64, ge=1, description="sequences per generate() call inside the engine")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="weights and activations of the engine's model; None: bfloat16 when num_gpus > 0, else "
        "float32 (CPU numbers stay those of fp32); float16 only with num_gpus > 0")
    vllm: VLLMOptions = VLLMOptions()
    max_restarts: int = operational(2, ge=0, description="times Ray restarts an engine actor that died (its process "
                                    "or node lost); the restarted engine reloads the model, gets the current "
                                    "trained weights again and the interrupted calls are re-run, so the results "
                                    "are those of a run without the loss. 0: a dead engine fails the stage")
    call_timeout_s: float = operational(1200.0, gt=0, description="deadline of one call on an engine (a rollout's "
                                        "generate, a weight update): past it the engine counts as hung and the "
                                        "stage fails naming it. Generous (a 38B model's rollout of long chains "
                                        "takes minutes) but under the trainers' collective timeout (Ray Train's "
                                        "30 min), which would otherwise fail the ranks waiting for a hung one "
                                        "first, with a message that does not name the engine")
    ready_timeout_s: float = operational(3600.0, gt=0, description="deadline for an engine actor to start and "
                                         "load its model (at the start, after a restart, on a model swap): a 38B "
                                         "checkpoint from a network volume can take tens of minutes")

    @model_validator(mode="after")
    def _dtype_fits_device(self) -> EngineConfig:
        if self.dtype == "float16" and self.num_gpus == 0:
            raise ValueError("dtype float16 needs num_gpus > 0: on CPU use float32 (or bfloat16)")
        tp = self.vllm.tensor_parallel_size
        if self.kind == "vllm" and self.num_gpus > 0 and self.num_gpus != tp:
            raise ValueError(f"num_gpus {self.num_gpus} per vllm engine must equal vllm.tensor_parallel_size {tp}: "
                             "vLLM's workers run on the actor's own GPUs")
        return self

    def resolved_dtype(self) -> str:
        """`dtype`, or its default for the device: bfloat16 with GPUs, float32 without."""
        return self.dtype or ("bfloat16" if self.num_gpus > 0 else "float32")

    def kind_options(self) -> dict[str, Any]:
        """Keyword arguments of the engine class that belong to its kind (the vllm settings for `vllm`)."""
        return self.vllm.model_dump() if self.kind == "vllm" else {}


class EvalEngineConfig(EngineConfig):
    """The eval stage's engines: Ray actors, each holding the model with these resources, while the workflow's
    driver only reads the corpus, sends the requests in chunks and grades (`r1v.eval.corpus`)."""

    kind: str = Field("transformers", min_length=1, description="rollout engine by name (the `r1v.generation.engines."
                      "ENGINES` registry: transformers, vllm); checked when the stage starts")
    num_engines: int = operational(1, ge=1, description="engine actors sharing the requests; each chunk carries its "
                                   "own seed, so predictions do not depend on this number")
    num_cpus: float = operational(1.0, ge=0, description="CPUs Ray reserves for each engine actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine actor (0: generate on CPU)")


Group = Literal["vision", "projector", "llm"]


def format_errors(source: str, prefix: str, err: ValidationError) -> str:
    """One line per pydantic error: `SOURCE: dotted.key: message (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)
