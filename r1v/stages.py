"""The stage kinds: thin functions `(ctx, config) -> outputs` over the library modules, registered by name.

Each stage writes only under its own `ctx.stage_dir` (corpora are never mutated in place) and returns the
paths that downstream stages refer to as `@stage.output`.
"""

from __future__ import annotations

from typing import Any

import r1v.data.import_stage  # noqa: F401  (registers data.import)
import r1v.distill.distill_stage  # noqa: F401  (registers distill)
import r1v.distill.stages  # noqa: F401  (registers distill.score)
import r1v.model.assemble_stage  # noqa: F401  (registers model.assemble)
import r1v.score.stages  # noqa: F401  (registers score, generate, select)
import r1v.world.stages  # noqa: F401  (registers data.world, model.world)
from r1v.config import (
    EvalConfig,
    GRPOConfig,
    ReassembleConfig,
    SFTConfig,
    SyntheticDataConfig,
    TinyModelConfig,
)
from r1v.workflow import STAGES, StageContext


@STAGES.register("data.synthetic")
def synthetic_data(ctx: StageContext, c: SyntheticDataConfig) -> dict[str, Any]:
    from r1v.data.synthetic import generate

    paths = generate(ctx.stage_dir / "corpus", c.n_train, c.n_test, seed=c.seed, width=c.width, height=c.height,
                     max_value=c.max_value, ops=list(c.ops), corrupt_rows=c.corrupt_rows)
    ctx.log.metrics({"rows_train": c.n_train, "rows_test": c.n_test, "rows_corrupted": c.corrupt_rows}, 0)
    return {"train": str(paths["train"]), "test": str(paths["test"])}


@STAGES.register("model.tiny")
def tiny_models(ctx: StageContext, c: TinyModelConfig) -> dict[str, Any]:
    """A substitute VLM (vision + projector + substitute LLM) and a separate 'reasoning' LLM of the same shape."""
    from r1v.model.io import save_llm, save_model
    from r1v.model.tiny import TinySpec, build_tiny_llm, build_tiny_vlm
    from r1v.model.tokenizer import build_tiny_tokenizer

    spec = TinySpec(**c.model_dump(exclude={"reasoning_seed"}))
    tok = build_tiny_tokenizer(vocab_size=c.vocab_size)
    vlm, tok = build_tiny_vlm(spec, tokenizer=tok)
    llm = build_tiny_llm(spec, tok, seed=c.reasoning_seed)
    model_dir = save_model(vlm, tok, ctx.stage_dir / "substitute_vlm")
    llm_dir = save_llm(llm, tok, ctx.stage_dir / "reasoning_llm")
    n = sum(p.numel() for p in vlm.parameters())
    ctx.log.metrics({"vlm_params": n}, 0)
    return {"model": str(model_dir), "llm": str(llm_dir)}


def off_driver(fn: Any, *args: Any, num_cpus: float = 1, num_gpus: float = 0) -> Any:
    """`fn(*args)` as a Ray task when Ray is up (as when `r1v run` runs stages): the driver never loads models."""
    import ray

    if not ray.is_initialized():
        return fn(*args)
    return ray.get(ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(fn).remote(*args))


@STAGES.register("reassemble")
def reassemble_stage(ctx: StageContext, c: ReassembleConfig) -> dict[str, Any]:
    """The aligned VLM's vision tower and projector in front of the reasoning LLM, written as a manifest (the
    projector plus the parts' paths and checksums: no weight is copied), in a Ray task."""
    from r1v.model.manifest import reassemble_model

    out = off_driver(reassemble_model, c.model, c.llm, ctx.stage_dir / "model")
    return {"model": str(out)}


def _hf_model(c: Any) -> Any:
    """`c` with its `model` in the HF layout: an InternVL-chat / Skywork-R1V checkpoint is converted once, here in
    the driver, so that workers and engines never race to convert it."""
    from r1v.model.convert import hf_view

    return c.model_copy(update={"model": str(hf_view(c.model))})


@STAGES.register("sft")
def sft_stage(ctx: StageContext, c: SFTConfig) -> dict[str, Any]:
    from r1v.train.sft import train_sft

    if ctx.attempt > 1:
        ctx.event("resuming", attempt=ctx.attempt)
    res = train_sft(_hf_model(c), ctx.stage_dir, ctx.tracking_uri, ctx.mlflow_run_id)
    for cnt in res["counts"]:
        ctx.log.dict(cnt, f"counts/epoch-{cnt['epoch']}.json")
    quarantine = ctx.stage_dir / "quarantine"
    quarantine.mkdir(exist_ok=True)
    return {"model": str(res["model"]), "quarantine": str(quarantine)}


@STAGES.register("grpo")
def grpo_stage(ctx: StageContext, c: GRPOConfig) -> dict[str, Any]:
    from r1v.rl.grpo import train_grpo

    if ctx.attempt > 1:
        ctx.event("resuming", attempt=ctx.attempt)
    res = train_grpo(_hf_model(c), ctx.stage_dir, ctx.tracking_uri, ctx.mlflow_run_id)
    return {"model": str(res["model"])}


@STAGES.register("eval")
def eval_stage(ctx: StageContext, c: EvalConfig) -> dict[str, Any]:
    """Generate in engine actors (`c.engine`: count, CPUs, GPUs, dtype) when Ray is up, as under `r1v run`; the
    driver reads, sends requests and grades; the actors stay a few seconds for the next eval stage, which then
    only loads its model into them. Without Ray, in this process."""
    import ray

    from r1v.eval.actors import KEEP_WARM_S
    from r1v.eval.stage import run_eval

    res = run_eval(_hf_model(c), ctx.stage_dir, ctx.log, actors=ray.is_initialized(), keep_warm_s=KEEP_WARM_S)
    return {"predictions": str(res["predictions"]), "summary": str(res["summary"])}
