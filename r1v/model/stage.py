"""The model stage kinds: `model.tiny` (tiny random models), `reassemble` (the aligned VLM's vision side in front
of the reasoning LLM) and `model.assemble` (a VLM from real parts)."""

from __future__ import annotations

from typing import Any

from r1v.model.config import AssembleConfig, ReassembleConfig, TinyModelConfig, TinySpec
from r1v.model.from_parts import assemble_from_parts
from r1v.model.manifest import reassemble_model
from r1v.workflow.runner import StageContext


def tiny_models(ctx: StageContext, c: TinyModelConfig) -> dict[str, Any]:
    """A substitute VLM (vision + projector + substitute LLM) and a separate 'reasoning' LLM of the same shape."""
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    from r1v.model.io import save_llm, save_model
    from r1v.model.tiny import build_tiny_llm, build_tiny_vlm
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


def reassemble_stage(ctx: StageContext, c: ReassembleConfig) -> dict[str, Any]:
    """The aligned VLM's vision tower and projector in front of the reasoning LLM, written as a manifest (the
    projector plus the parts' paths and checksums: no weight is copied), in a Ray task."""
    out = off_driver(reassemble_model, c.model, c.llm, ctx.stage_dir / "model")
    return {"model": str(out)}


def assemble_stage(ctx: StageContext, c: AssembleConfig) -> dict[str, Any]:
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    from r1v.model.io import save_model

    model, tok, report = assemble_from_parts(c.vision, c.llm, c.projector, c.seed, c.dtype)
    out = save_model(model, tok, ctx.stage_dir / "model")
    ctx.event("assembled", **report)
    ctx.log.dict(report, "assemble.json")
    return {"model": str(out)}
