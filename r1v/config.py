"""The typed config tree: a workflow YAML plus `a.b=c` overrides, validated at load.

Every stage kind has a pydantic model here, so a misspelt or ill-typed key fails when the workflow is loaded
(naming the file and the dotted key), not an hour into a run. Models forbid unknown keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from r1v.model.spec import TinySpec
from r1v.plan_arch import PlanConfig
from r1v.registry import Registry


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="0.5 on 2-core machines: Ray Data needs a CPU too")
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3
    param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3 keeps parameters with fewer elements than this gathered on every rank "
        "(DeepSpeed's default); 0 re-gathers every parameter in every forward")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="engine dtype; None: bfloat16 with use_gpu (DeepSpeed keeps fp32 master weights of the "
        "trainable parameters), float32 without")
    torch_threads: int = Field(1, ge=1)
    activation_checkpointing: bool = Field(False, description="recompute the LLM's activations in backward "
                                           "(less memory, ~1/3 more compute)")
    seed: int = 0

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


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)


class VLLMOptions(Strict):
    """Settings of the `vllm` engine (`r1v.rl.engine_vllm`); the transformers engine ignores them."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; the actor's num_gpus must equal it")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="vLLM's share of each GPU (the vision "
                                          "tower and projector are held beside it, in torch)")
    max_model_len: int | None = Field(None, ge=1, description="None: the model config's")
    kv_cache_gb: float = Field(1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU (compiling costs ~40 s a start), "
                                       "CUDA graphs on GPU")


class EngineConfig(Strict):
    kind: str = Field("transformers", description="rollout engine (`r1v.rl.engines.ENGINES`): transformers "
                      "(CPU/GPU) or vllm (vLLM on GPU, vllm-cpu on CPU)")
    num_engines: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0, description="0 so that engines never starve the trainer of CPUs")
    num_gpus: float = Field(0.0, ge=0)
    max_batch: int = Field(64, ge=1, description="sequences per generate() call inside the engine")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="weights and activations of the engine's model; None: bfloat16 when num_gpus > 0, else "
        "float32 (CPU numbers stay those of fp32); float16 only with num_gpus > 0")
    vllm: VLLMOptions = VLLMOptions()

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
    driver only reads the corpus, sends the requests in chunks and grades (`r1v.eval.stage`)."""

    kind: str = Field("transformers", min_length=1, description="rollout engine by name (the `r1v.rl.engines."
                      "ENGINES` registry: transformers, vllm); checked when the stage starts")
    num_engines: int = Field(1, ge=1, description="engine actors sharing the requests; each chunk carries its own "
                             "seed, so predictions do not depend on this number")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each engine actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine actor (0: generate on CPU)")


Group = Literal["vision", "projector", "llm"]


# --------------------------------------------------------------------------- stage configs

STAGE_CONFIGS: Registry[type[BaseModel]] = Registry("stage kind")


@STAGE_CONFIGS.register("data.synthetic")
class SyntheticDataConfig(Strict):
    """A visual arithmetic task: numbers drawn in an image, the answer needs reading them and one operation."""

    n_train: int = Field(64, ge=1)
    n_test: int = Field(16, ge=1)
    seed: int = 0
    width: int = Field(112, ge=16)
    height: int = Field(56, ge=16)
    max_value: int = Field(9, ge=1)
    ops: list[Literal["sum", "difference", "product", "max"]] = ["sum", "difference", "product"]
    corrupt_rows: int = Field(0, ge=0, description="rows with undecodable images, to exercise the quarantine")


@STAGE_CONFIGS.register("model.tiny")
class TinyModelConfig(TinySpec):
    """Tiny random models for tests and the demo: a substitute VLM (built with `seed`) and a second
    "reasoning" LLM of the same shape (built with `reasoning_seed`)."""

    reasoning_seed: int = 1


@STAGE_CONFIGS.register("reassemble")
class ReassembleConfig(Strict):
    model: str = Field(description="VLM whose vision tower and projector are kept")
    llm: str = Field(description="causal LM directory that replaces the VLM's language model")


@STAGE_CONFIGS.register("model.assemble")
class AssembleConfig(Strict):
    """A VLM from real parts: a vision tower (and maybe its projector) and a reasoning LLM."""

    vision: str = Field(description="InternVL-chat or HF InternVL checkpoint: its vision tower (and projector)")
    llm: str = Field(description="local HF Qwen2 causal LM directory (the DeepSeek-R1-Distill-Qwen layout)")
    projector: Literal["fresh", "from_vision"] = "fresh"
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "bfloat16"


@STAGE_CONFIGS.register("sft")
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
    grad_accum: int = Field(1, ge=1)
    packing: bool = Field(False, description="pack rows into token-budget sequences (no cross-sample attention)")
    max_tokens: int = Field(4096, ge=16, description="token budget of one packed sequence")
    pack_buffer: int = Field(256, ge=1, description="rows considered together when forming packed sequences, "
                             "and the window that `shuffle` shuffles on each worker")
    shuffle: bool = Field(True, description="visit the corpus in a new order every epoch, drawn from trainer.seed: "
                          "row groups permuted, then rows within each pack_buffer window")
    checkpoint_every: int = Field(10, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    projector_norm_reg: float = Field(0.0, ge=0, description="weight of (||projector output|| / mean "
                                      "token-embedding norm - 1)^2, averaged over image tokens, added to the loss "
                                      "(0: off): pulls image features to the scale of the LLM's token embeddings "
                                      "(r1v.train.projector_reg; a compared option, README)")


@STAGE_CONFIGS.register("eval")
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
    engine: EvalEngineConfig = EvalEngineConfig(max_batch=512)  # big batches: eval keeps no logits (r1v.eval.stage)
    seed: int = 0
    mode: Literal["vlm", "no_image", "text"] = Field(
        "vlm", description="vlm: the corpus as is; no_image: every tile blanked (uint8 zeros, same count), so the "
        "answer cannot come from the image; text: `model` is a causal LM asked meta.text_question (corpus only)")
    greedy: bool = Field(True, description="one greedy generation per item gives `accuracy` (corpus only); the "
                         "`samples` sampled ones give pass_at_1")
    torch_threads: int | None = Field(1, ge=1, description="torch threads of each engine (None: engine.num_cpus in "
                                      "an actor, at least 1; every CPU it may use in-process); 1 is fastest for tiny "
                                      "models and robust on busy CPUs")
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


# --------------------------------------------------------------------------- workflow


class StageSpec(Strict):
    kind: str
    needs: list[str] = []
    config: dict[str, Any] = {}


class WorkflowConfig(Strict):
    name: str
    run_root: str = "runs"
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    seed: int | None = Field(None, description="when set, reseeds every stage: see `reseed`")
    stages: dict[str, StageSpec]
    plan: PlanConfig | None = Field(None, description="architectures and assumptions for `r1v plan`; "
                                    "`r1v run` ignores it")

    @field_validator("plan")
    @classmethod
    def _plan_names_stages(cls, v: PlanConfig | None, info: Any) -> PlanConfig | None:
        if v is not None and "stages" in info.data:
            v.check_stages({name: s.kind for name, s in info.data["stages"].items()})
        return v


class Workflow(BaseModel):
    """A loaded workflow: the validated tree plus each stage's validated config object."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str
    raw: dict[str, Any]
    config: WorkflowConfig
    stage_configs: dict[str, BaseModel]

    def fingerprint(self, stage: str) -> str:
        spec = self.config.stages[stage]
        payload = {"kind": spec.kind, "config": self.stage_configs[stage].model_dump(mode="json")}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], parsed c); values are YAML scalars/lists so `x=3`, `x=[1,2]`, `x=null` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key segment")
    return parts, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def _format_errors(source: str, prefix: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def validate_workflow(raw: dict[str, Any], source: str = "<config>") -> Workflow:
    from r1v.repeat import expand_repeats  # here: r1v.repeat imports this module

    raw = expand_repeats(raw, source)  # repeat blocks -> ordinary stages; Workflow.raw keeps the expanded form
    try:
        cfg = WorkflowConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, "", e)) from None
    stage_configs: dict[str, BaseModel] = {}
    for name, spec in cfg.stages.items():
        if spec.kind not in STAGE_CONFIGS:
            raise ConfigError(
                f"{source}: stages.{name}.kind: unknown stage kind {spec.kind!r}; known: "
                + ", ".join(STAGE_CONFIGS.names())
            )
        try:
            stage_configs[name] = STAGE_CONFIGS.get(spec.kind).model_validate(spec.config)
        except ValidationError as e:
            raise ConfigError(_format_errors(source, f"stages.{name}.config", e)) from None
        if cfg.seed is not None:
            try:
                stage_configs[name] = reseed(stage_configs[name], cfg.seed)
            except ValidationError as e:
                raise ConfigError(_format_errors(source, f"stages.{name}.config (after seed={cfg.seed})", e)
                                  ) from None
        for dep in spec.needs:
            if dep not in cfg.stages:
                raise ConfigError(f"{source}: stages.{name}.needs: unknown stage {dep!r}")
    _check_report_roles(cfg, stage_configs, source)
    return Workflow(source=source, raw=raw, config=cfg, stage_configs=stage_configs)


def reseed(config: BaseModel, seed: int) -> BaseModel:
    """`config` with every field named `seed`, at any depth, set to `seed` (so `r1v run wf.yaml seed=3` reruns the
    whole recipe under another seed, and every fingerprint changes with it).

    A model's other `*_seed` fields take seed+1, seed+2, ... in declaration order, because they exist to differ
    from its `seed` (TinyModelConfig.reasoning_seed: the reasoning LLM must not be the substitute LLM).
    """
    return type(config).model_validate(_reseeded(config, seed))


def _reseeded(m: BaseModel, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    offset = 0
    for name in type(m).model_fields:
        value = getattr(m, name)
        if name == "seed":
            out[name] = seed
        elif name.endswith("_seed"):
            offset += 1
            out[name] = seed + offset
        elif isinstance(value, BaseModel):
            out[name] = _reseeded(value, seed)
        else:
            out[name] = value
    return out


def _check_report_roles(cfg: WorkflowConfig, stage_configs: dict[str, BaseModel], source: str) -> None:
    """Each results-table row is filled by at most one eval stage, and a reported stage exists."""
    seen: dict[tuple[str, str], str] = {}
    for name, c in stage_configs.items():
        if not isinstance(c, EvalConfig):
            continue
        if c.report_stage and c.report_stage not in cfg.stages:
            raise ConfigError(f"{source}: stages.{name}.config.report_stage: unknown stage {c.report_stage!r}")
        role = ("report_stage", c.report_stage) if c.report_stage else ("report_baseline", c.report_baseline)
        if role[1] is None:
            continue
        if role in seen:
            raise ConfigError(f"{source}: stages.{name}.config.{role[0]}: {role[1]!r} is already reported by "
                              f"stage {seen[role]!r}")
        seen[role] = name


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"workflow file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    from r1v.repeat import apply_overrides_and_expand  # overrides may name a repeat block or an expanded stage

    raw = apply_overrides_and_expand(raw, overrides or [], str(path))
    return validate_workflow(raw, str(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}, for logging configs as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Stage configs that live next to their feature; imported last because they import from this module.
import r1v.data.import_config  # noqa: E402,F401
import r1v.distill.config  # noqa: E402,F401
import r1v.distill.distill_config  # noqa: E402,F401
import r1v.score.config  # noqa: E402,F401
import r1v.world.config  # noqa: E402,F401

# GRPO's config lives next to GRPO; re-exported here, where callers have always imported it from.
from r1v.rl.grpo_config import DynamicSamplingConfig, GRPOConfig, ReplayConfig  # noqa: E402,F401
