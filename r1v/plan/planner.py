"""`r1v plan WORKFLOW --gpus N --gpu-memory 80GB [overrides]`: will each stage fit, and what does it cost?

Loads and validates the workflow (no Ray, no model is built), finds the architecture of every model a stage uses
(a folder's config.json when the folder is here, else the preset named in the workflow's `plan.architectures`;
`@stage.output` references are followed back through the stages that make them) and prints per stage: parameters,
trainable parameters, per-GPU memory (weights, gradients, optimizer states, activations), FLOPs per step and the
bytes it writes. Exits 1, naming each stage and its shortfall, when one does not fit. The cost model is in
`r1v.plan.cost`, the architectures in `r1v.plan.arch`.

It models r1v as it is, each stage with its own settings (activation checkpointing, GRPO's micro-batches); engine
kinds r1v does not register are listed under the table. Stages of iterative SFT: `generate` is sized like eval (its
engines), with FLOPs per corpus row in a note because the row count is the corpus's; `score` counts the GPUs of a
`local` scorer and none for an `openai` judge (served elsewhere; noted); `select` runs on the driver's CPU.
AL-CoTD's stages the same way: `distill` like `generate` (one chain per row; its rewriting judge is served
elsewhere, noted), and `distill.score` like `score`, the GPUs of its `local` judges summed (all three are open at
once).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v.plan.arch import PRESETS, Arch, ArchError, LLMArch, PlanConfig, VisionArch, VLMArch, arch_from_dir
from r1v.plan.cost import (
    DTYPE_BYTES,
    GB,
    engine_memory,
    generate_flops,
    model_states,
    sample_tiles,
    train_activations,
    train_flops,
    vision_working_set,
)
from r1v.workflow.refs import REF

# Items per benchmark (the shipped releases), for eval FLOPs and output bytes.
BENCH_ITEMS = {"math500": 500, "aime24": 30, "aime25": 30, "mathvista": 1000, "mmmu": 900, "mathv": 3040}
BENCH_ITEMS["mathv-testmini"] = 304


class PlanError(ValueError):
    """A model that cannot be sized; the message names the stage and field."""


def parse_memory(text: str) -> float:
    """'80GB' (1e9 bytes), '141GiB' (2^30), '24G', '80' (GB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|G|GiB|TB|TiB|MB|MiB)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 80GB or 141GiB")
    unit = (m.group(2) or "GB").lower()
    scale = {"gb": 1e9, "g": 1e9, "gib": 2**30, "tb": 1e12, "tib": 2**40, "mb": 1e6, "mib": 2**20}[unit]
    return float(m.group(1)) * scale


@dataclass
class Row:
    """One line of the table: a stage, or one role of it (a GRPO stage has a trainer and rollout engines)."""

    stage: str
    kind: str
    role: str = "-"
    gpus: int = 0
    params: int | None = None
    trainable: int | None = None
    # per GPU: weights, gradients, optimizer states (None: an engine has none), activations
    mem: tuple[float, float | None, float | None, float] | None = None
    flops: float | None = None
    output: float | None = None
    total: float | None = None
    short_gb: float = 0.0


@dataclass
class Plan:
    rows: list[Row]
    gpus: int
    gpu_bytes: float
    reserve: float
    assumed: dict[str, list[str]] = field(default_factory=dict)  # assumption -> stages that rely on it
    notes: dict[str, list[str]] = field(default_factory=dict)  # note -> stages it applies to

    def note(self, text: str, stage: str) -> None:
        stages = self.notes.setdefault(text, [])
        if stage not in stages:  # a stage may say the same thing twice (distill.score: one endpoint, three judges)
            stages.append(stage)

    def host_note(self, what: str, nbytes: float, stage: str) -> None:
        if nbytes >= GB:  # worth a line from 1 GB on
            self.note(f"{what}: {nbytes / GB:.1f} GB host RAM", stage)

    def stage_gpus(self) -> dict[str, int]:
        """GPUs each stage holds at once (a GRPO stage: its trainer and its rollout engines)."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.stage] = out.get(r.stage, 0) + r.gpus
        return out

    def refusals(self) -> list[str]:
        out = [
            f"stage {s!r} needs {n} GPUs, {n - self.gpus} more than the {self.gpus} given"
            for s, n in self.stage_gpus().items()
            if n > self.gpus
        ]
        for r in self.rows:
            if r.short_gb > 0:
                out.append(
                    f"stage {r.stage!r} ({r.role}) needs {r.total / GB:.1f} GB per GPU, {r.short_gb:.1f} GB more "
                    f"than the {self.gpu_bytes / GB:.1f} GB given"
                )
        return out


class Planner:
    def __init__(self, wf: Any, gpus: int, gpu_bytes: float) -> None:
        self.wf = wf
        self.cfg: PlanConfig = getattr(wf.config, "plan", None) or PlanConfig()
        self.plan = Plan([], gpus, gpu_bytes, self.cfg.reserve_gb * GB)

    # ----------------------------------------------------------------- architectures
    def _kind(self, stage: str) -> str:
        return self.wf.config.stages[stage].kind

    def field_arch(self, stage: str, fld: str, depth: int = 0) -> Arch:
        """The architecture that config field `fld` of `stage` names: a reference, a folder or a preset."""
        if depth > 50:
            raise PlanError(f"stages.{stage}.config.{fld}: references form a cycle")
        value = getattr(self.wf.stage_configs[stage], fld)
        if m := REF.match(str(value)):
            return self.output_arch(m.group(1), m.group(2), depth + 1)
        found = arch_from_dir(value, vision_only=self._kind(stage) == "model.assemble" and fld == "vision")
        source = f"{value}/config.json"
        if found is None:
            preset = self.cfg.architectures.get(f"{stage}.{fld}")
            if preset is None:
                raise PlanError(
                    f"stages.{stage}.config.{fld}: no config.json at {value!r} and no preset for it: add "
                    f"plan.architectures.{stage}.{fld}: <one of {', '.join(PRESETS)}>"
                )
            found, source = PRESETS[preset], f"preset {preset}"
        self.plan.note(f"{stage}.{fld}: {source}", stage)
        return found

    def output_arch(self, stage: str, out: str, depth: int = 0) -> Arch:
        """The architecture of output `out` of `stage` (what `@stage.out` refers to)."""
        if stage not in self.wf.config.stages:
            raise PlanError(f"@{stage}.{out}: no stage {stage!r}")
        kind, c = self._kind(stage), self.wf.stage_configs[stage]
        if kind == "model.assemble" and out == "model":
            vis, llm = self.field_arch(stage, "vision", depth), self.field_arch(stage, "llm", depth)
            return VLMArch(
                vis.vision if isinstance(vis, VLMArch) else _need(vis, VisionArch, stage, "vision"),
                _need(llm.llm if isinstance(llm, VLMArch) else llm, LLMArch, stage, "llm"),
                vis.downsample_ratio if isinstance(vis, VLMArch) else 0.5,
            )
        if kind == "reassemble" and out == "model":
            vlm = _need(self.field_arch(stage, "model", depth), VLMArch, stage, "model")
            llm = _need(self.field_arch(stage, "llm", depth), LLMArch, stage, "llm")
            return VLMArch(vlm.vision, llm, vlm.downsample_ratio)
        if kind in ("sft", "grpo") and out == "model":
            return self.field_arch(stage, "model", depth)
        if kind == "model.tiny" and out in ("model", "llm"):
            return _tiny(c) if out == "model" else _tiny(c).llm
        if kind == "model.world" and out in ("model", "llm", "instruct_llm"):
            return _world(c.world, out)
        raise PlanError(f"@{stage}.{out}: r1v plan cannot size output {out!r} of a {kind} stage")

    # ----------------------------------------------------------------- stages
    def run(self) -> Plan:
        for name in self.wf.config.stages:  # file order; references are followed wherever they point
            kind, c = self._kind(name), self.wf.stage_configs[name]
            handler = getattr(self, "_" + kind.replace(".", "_"), None)
            try:
                self.plan.rows.extend(handler(name, c) if handler else [Row(name, kind)])
            except ArchError as e:
                raise PlanError(f"stages.{name}: {e}") from None
        for r in self.plan.rows:
            if r.mem is not None and r.gpus:
                r.total = sum(x or 0.0 for x in r.mem) + self.plan.reserve
                r.short_gb = max(0.0, (r.total - self.plan.gpu_bytes) / GB)
        return self.plan

    def _assume(self, what: str, stage: str) -> None:
        self.plan.assumed.setdefault(what, []).append(stage)

    def _checkpointing(self, name: str, c: Any) -> bool:
        """Activation checkpointing: the trainer's switch (`r1v.train.worker` applies it in SFT and GRPO)."""
        return c.trainer.activation_checkpointing

    def _model_assemble(self, name: str, c: Any) -> list[Row]:
        arch = self.output_arch(name, "model")
        self.plan.host_note("builds the VLM on the driver, its LLM loaded in float32", 4.0 * arch.params(), name)
        out = arch.params() * DTYPE_BYTES.get(str(getattr(c, "dtype", "float32")), 4)
        return [Row(name, "model.assemble", "cpu", params=arch.params(), output=float(out))]

    def _model_tiny(self, name: str, c: Any) -> list[Row]:
        arch = _tiny(c)
        return [Row(name, "model.tiny", "cpu", params=arch.params(), output=4.0 * (arch.params() + arch.llm.params()))]

    def _model_world(self, name: str, c: Any) -> list[Row]:
        arch = _world(c.world, "model")
        return [Row(name, "model.world", "cpu", params=arch.params(), output=4.0 * arch.params())]

    def _reassemble(self, name: str, c: Any) -> list[Row]:
        arch = self.output_arch(name, "model")
        host = 4.0 * (self.field_arch(name, "model").params() + self.field_arch(name, "llm").params())
        self.plan.host_note("loads both models in float32 on the driver", host, name)
        return [Row(name, "reassemble", "cpu", params=arch.params(), output=4.0 * arch.params())]

    def _trainer(
        self, name: str, c: Any, arch: VLMArch, b: int, s: int, tiles: int, extra: float = 0.0
    ) -> tuple[Row, bool]:
        """The trainer row of an SFT or GRPO stage: micro-batches of b sequences of s tokens holding `tiles` tiles,
        `extra` activation bytes besides them; and whether it checkpoints activations."""
        t, ckpt = c.trainer, self._checkpointing(name, c)
        groups = arch.groups()
        trainable = sum(groups[g] for g in set(c.trainable))
        states = model_states(arch.params(), trainable, arch.largest_module(), t.num_workers, t.zero_stage, t.dtype)
        act = train_activations(arch, b, s, tiles, DTYPE_BYTES[t.dtype], c.trainable, ckpt) + extra
        self.plan.host_note(
            "each worker loads the whole model in float32 (r1v.model.io.load_model) before "
            "DeepSpeed partitions it, per worker",
            4.0 * arch.params(),
            name,
        )
        out = 4.0 * arch.params() + c.keep_checkpoints * 12.0 * trainable  # export in fp32 + optimizer checkpoints
        row = Row(
            name,
            self._kind(name),
            "train",
            t.num_workers if t.use_gpu else 0,
            arch.params(),
            trainable,
            (*states, act),
            output=out,
        )
        return row, ckpt

    def _sft(self, name: str, c: Any) -> list[Row]:
        arch = _need(self.field_arch(name, "model"), VLMArch, name, "model")
        s = c.max_tokens if c.packing else c.preprocess.max_length
        rows = max(1, 2 * c.max_tokens // c.preprocess.max_length) if c.packing else 1  # r1v.train.sft's guess
        tiles = c.batch_size * min(rows * sample_tiles(c.preprocess), s // arch.tokens_per_tile())
        row, ckpt = self._trainer(name, c, arch, c.batch_size, s, tiles)
        micro = train_flops(arch, c.batch_size, s, tiles, c.trainable, ckpt)
        row.flops = c.trainer.num_workers * c.grad_accum * micro
        return [row]

    def _grpo(self, name: str, c: Any) -> list[Row]:
        arch = _need(self.field_arch(name, "model"), VLMArch, name, "model")
        group = c.prompts_per_step * c.group_size
        s = c.preprocess.max_length + c.sampling.max_new_tokens
        mb = c.batch_sizes(group)[1]  # samples per forward/backward, as r1v.rl.update runs them
        tiles, d = sample_tiles(c.preprocess), DTYPE_BYTES[c.trainer.dtype]
        # vision features: computed once per prompt, then repeated for each sample of its group (r1v.rl.update)
        feats = (c.prompts_per_step + group) * tiles * arch.tokens_per_tile() * arch.projector_in * d
        row, ckpt = self._trainer(name, c, arch, mb, s, mb * tiles, feats)
        vision = vision_working_set(arch, c.prompts_per_step * tiles, d)
        row.mem = (*row.mem[:3], max(row.mem[3], vision))
        # per worker: vision once per prompt; old (+ reference) log-probs; ppo_epochs updates in micro-batches
        scoring = (1 + (c.kl_coef > 0)) * generate_flops(arch.llm, group, s, 0)
        update = math.ceil(group / mb) * train_flops(arch, mb, s, mb * tiles, c.trainable, ckpt, vision=False)
        row.flops = c.trainer.num_workers * (
            c.prompts_per_step * tiles * arch.vision.forward_flops_per_tile() + scoring + c.ppo_epochs * update
        )
        rollout = generate_flops(arch, c.trainer.num_workers * group, s, tiles)
        engine = self._engine_row(
            name,
            "grpo",
            "rollout",
            arch,
            c.engine,
            min(c.engine.max_batch, group),
            s,
            c.sampling.max_new_tokens,
            True,
            rollout,
        )
        return [row, engine]

    def _eval(self, name: str, c: Any) -> list[Row]:
        arch = self.field_arch(name, "model")
        if not isinstance(arch, VLMArch):
            _need(arch, LLMArch, name, "model")
        s = c.preprocess.max_length + c.sampling.max_new_tokens
        items = c.limit or BENCH_ITEMS.get(c.benchmark or "")
        flops = generate_flops(arch, items * c.samples, s, sample_tiles(c.preprocess)) if items else None
        out = items * c.samples * c.sampling.max_new_tokens * 4.0 * 2 if items else None  # ~4 bytes/token, twice
        return [
            self._engine_row(
                name,
                "eval",
                "engine",
                arch,
                c.engine,
                c.engine.max_batch,
                s,
                c.sampling.max_new_tokens,
                False,
                flops,
                out,
            )
        ]

    def _generate(self, name: str, c: Any) -> list[Row]:
        """The eval stage's engines answering a corpus: memory like eval, FLOPs per row (the corpus sets the count)."""
        arch = self.field_arch(name, "model")
        if not isinstance(arch, VLMArch):
            _need(arch, LLMArch, name, "model")
        s = c.preprocess.max_length + c.sampling.max_new_tokens
        n = int(c.greedy) + c.samples
        per_row = generate_flops(arch, n, s, sample_tiles(c.preprocess))
        self.plan.note(f"generate: at most {per_row / 1e15:.3g} PFLOP per corpus row ({n} x {s} tokens)", name)
        return [
            self._engine_row(
                name,
                "generate",
                "engine",
                arch,
                c.engine,
                c.engine.max_batch,
                s,
                c.sampling.max_new_tokens,
                False,
                None,
            )
        ]

    def _score(self, name: str, c: Any) -> list[Row]:
        """A scorer's GPUs (a `local` one's actors); an `openai` judge runs outside the planned GPUs."""
        s = c.scorer
        gpus = math.ceil(getattr(s, "num_actors", 1) * getattr(s, "num_gpus", 0.0))
        if s.kind == "openai":
            self.plan.note(f"scorer at {s.base_url} (model {s.model!r}): served outside the GPUs planned here", name)
        elif gpus:
            self.plan.note(f"{s.kind} scorer: its {gpus} GPUs are counted, its model's memory is not sized", name)
        return [Row(name, "score", s.kind, gpus)]

    def _distill(self, name: str, c: Any) -> list[Row]:
        """Self-distillation: the eval stage's engines write one chain per row, like generate; the judge that
        rewrites the wrong ones (`rule` on the driver, `openai` served elsewhere) holds none of the planned GPUs."""
        arch = self.field_arch(name, "model")
        if not isinstance(arch, VLMArch):
            _need(arch, LLMArch, name, "model")
        s = c.preprocess.max_length + c.sampling.max_new_tokens
        per_row = generate_flops(arch, 1, s, sample_tiles(c.preprocess))
        self.plan.note(f"distill: at most {per_row / 1e15:.3g} PFLOP per corpus row (1 x {s} tokens)", name)
        if c.judge.kind == "openai":
            self.plan.note(
                f"rewriter at {c.judge.base_url} (model {c.judge.model!r}): served outside the GPUs planned here", name
            )
        row = self._engine_row(
            name, "distill", "engine", arch, c.engine, c.engine.max_batch, s, c.sampling.max_new_tokens, False, None
        )
        return [row]

    def _distill_score(self, name: str, c: Any) -> list[Row]:
        """QDAM/VTIA/DRLC: image and text cues on the driver's CPU, plus up to three judges held open together:
        the GPUs of the `local` ones add up; an `openai` one is served elsewhere (noted)."""
        judges = [j.scorer for j in (c.vision_judge, c.text_judge, c.integration_judge) if j is not None]
        gpus = sum(math.ceil(getattr(s, "num_actors", 1) * getattr(s, "num_gpus", 0.0)) for s in judges)
        for s in judges:
            if s.kind == "openai":
                self.plan.note(
                    f"scorer at {s.base_url} (model {s.model!r}): served outside the GPUs planned here", name
                )
        if gpus:
            self.plan.note(
                f"distill.score judges: their {gpus} GPUs are counted, their models' memory is not sized", name
            )
        role = "+".join(sorted({s.kind for s in judges})) or "cpu"
        return [Row(name, "distill.score", role, gpus)]

    def _select(self, name: str, c: Any) -> list[Row]:
        return [Row(name, "select", "cpu")]

    def _engine_row(
        self,
        name: str,
        kind: str,
        role: str,
        arch: Arch,
        e: Any,
        seqs: int,
        s: int,
        new: int,
        logprobs: bool,
        flops: float | None,
        out: float | None = None,
    ) -> Row:
        if e.kind not in ("vllm", "transformers"):
            self.plan.note(f"engine kind {e.kind!r} is not modelled: sized as 'transformers'", name)
        weights, act, tp = engine_memory(arch, e.kind, e.num_gpus, seqs, s, new, logprobs)
        if e.kind == "vllm":
            spare = self.plan.gpu_bytes - self.plan.reserve - weights
            if spare > act:
                self.plan.note(f"vLLM KV cache room for ~{int(spare // act)} sequences of {s} tokens per engine", name)
            if not _engine_registered("vllm"):
                self._assume("engine kind 'vllm' (not registered in r1v.generation.engines)", name)
        # grpo's rollout engines, or the engine actors of eval and generate (r1v.generation.warm_pool), num_gpus each
        gpus = e.num_engines * tp if e.num_gpus > 0 else 0
        return Row(name, kind, role, gpus, arch.params(), None, (weights, None, None, act), flops, out)


def _need(arch: Arch, cls: type, stage: str, fld: str) -> Any:
    if not isinstance(arch, cls):
        want, got = cls.__name__.removesuffix("Arch"), type(arch).__name__.removesuffix("Arch")
        raise PlanError(f"stages.{stage}.config.{fld}: expected a {want} model, found a {got} one")
    return arch


def _tiny(c: Any) -> VLMArch:
    """The model.tiny VLM (its vocabulary is at most spec.vocab_size: the tokenizer may have fewer ids)."""
    vis = VisionArch(
        hidden=c.vision_hidden_size,
        layers=c.vision_layers,
        heads=c.vision_heads,
        intermediate=4 * c.vision_hidden_size,
        image_size=c.tile_size,
        patch_size=c.patch_size,
    )
    llm = LLMArch(
        hidden=c.hidden_size,
        layers=c.num_layers,
        heads=c.num_heads,
        kv_heads=c.num_kv_heads,
        intermediate=c.intermediate_size,
        vocab=c.vocab_size,
    )
    return VLMArch(vis, llm)


def _world(world: str | None, out: str) -> Arch:
    root = Path(world) if world else Path(__file__).parent / "world" / "backbones"
    lm = arch_from_dir(root / {"model": "instruct_llm", "instruct_llm": "instruct_llm", "llm": "reasoning_llm"}[out])
    vis = arch_from_dir(root / "vision_tower") if out == "model" else None
    if lm is None or (out == "model" and vis is None):
        raise PlanError(f"no world backbones at {root}")
    return VLMArch(vis, lm) if vis is not None else lm


def _engine_registered(kind: str) -> bool:
    try:
        # imported on use, to keep torch out of light paths
        from r1v.generation.engines import ENGINES
    except ImportError:
        return False
    return kind in ENGINES
