"""DeepSpeed engine set-up, parameter gathering and model export, shared by the SFT and GRPO workers.

Only trainable tensors go to the optimizer, so with the default projector-only policy the optimizer state is
the projector's (MBs) while ZeRO-3 still shards the frozen backbones' weights across workers.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r1v.core.config import OptimConfig, TrainerConfig
from r1v.core.errors import NotRetryable
from r1v.core.fs import atomic_directory
from r1v.core.lean import without
from r1v.model.convert_keys import hf_disk_key
from r1v.model.full_export import ShardWriter, finish_full
from r1v.model.manifest import PROJECTOR_PREFIX, write_projector_model
from r1v.train.device import collective_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier: linear warm-up then cosine decay to `min_lr_ratio` (the paper: warm-up ratio 0.03)."""
    warm = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def ds_config(trainer: TrainerConfig, optim: OptimConfig, micro_batch: int, grad_accum: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": trainer.zero_stage,
                              "stage3_param_persistence_threshold": trainer.param_persistence_threshold},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused/CPU Adam compiles a C++ op (~50 s) on first use (RUNTIME-NOTES).
            "params": {"lr": optim.lr, "betas": list(optim.betas), "weight_decay": optim.weight_decay,
                       "torch_adam": True},
        },
        "bf16": {"enabled": trainer.dtype == "bfloat16"},
        "fp16": {"enabled": trainer.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_deepspeed():
    """Import DeepSpeed with this machine's settings (before any DeepSpeed call in a process)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with without("mlflow"):  # its autotuner's logging, unused (r1v/core/lean.py)
        import deepspeed
        import deepspeed.ops

    if not torch.cuda.is_available():
        # The CPU shared-memory allreduce op compiles for ~80 s on first use; gloo does the job here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_engine(model: torch.nn.Module, trainer: TrainerConfig, optim: OptimConfig, total_steps: int,
                micro_batch: int, grad_accum: int = 1):
    deepspeed = prepare_deepspeed()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check `trainable` in the stage config")
    sched = warmup_cosine(total_steps, optim.warmup_ratio, optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config(trainer, optim, micro_batch, grad_accum),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched),
    )
    return engine


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """Context manager giving full tensors under ZeRO-3 (a no-op context otherwise). All ranks must enter. With
    `modifier_rank`, that rank's changes are broadcast and re-partitioned on exit."""
    import contextlib

    params = list(params)
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def named_tensors(module: torch.nn.Module, only_trainable: bool, rank: int) -> dict[str, torch.Tensor]:
    """Full copies of (trainable) parameters on rank 0; every rank must call it (it gathers)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if only_trainable and not p.requires_grad:
            continue
        with gathered([p]):
            if rank == 0:
                out[name] = p.detach().to("cpu", copy=True)
    return out


def export_model(engine, base_model_dir: str, out_dir: Path, rank: int) -> None:
    """Write the trained model to `out_dir`; every rank must call it (it gathers), rank 0 writes.

    Projector-only training (no trainable parameter outside `multi_modal_projector`): only the projector's
    tensors are gathered, and `out_dir` becomes a manifest directory naming the frozen parts of
    `base_model_dir` (`r1v.model.manifest`): MBs, where a copy of the model is 77 GB at 38B. Otherwise a full HF
    checkpoint, streamed one gathered parameter at a time into safetensors shards in the parameters' dtype (no
    second copy of the model on rank 0), with the base's config and tokenizer files.
    """
    from contextlib import nullcontext


    named = [(hf_disk_key(n), p) for n, p in engine.module.named_parameters()]
    if all(k.startswith(PROJECTOR_PREFIX) for k, p in named if p.requires_grad):
        state: dict[str, torch.Tensor] = {}
        for key, p in named:
            if key.startswith(PROJECTOR_PREFIX):
                with gathered([p]):
                    if rank == 0:
                        state[key] = p.detach().to("cpu", copy=True)
        if rank == 0:
            write_projector_model(out_dir, base_model_dir, state)
    else:
        with atomic_directory(out_dir) if rank == 0 else nullcontext() as tmp:
            writer = ShardWriter(tmp) if rank == 0 else None
            for key, p in named:
                with gathered([p]):
                    if writer is not None:
                        writer.add(key, p.detach().to("cpu", copy=True))
            if writer is not None:
                finish_full(tmp, base_model_dir, writer)
    barrier()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, on the device the process group needs (see `collective_device`)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_named(values: dict[str, float]) -> dict[str, float]:
    """Sums over ranks by name. Ranks may hold different names (e.g. a reward failure seen on one rank only):
    the union is taken first, a name a rank lacks counts 0 there."""
    names = sorted(set().union(*[set(k) for k in gather_objects(sorted(values))]))
    return dict(zip(names, all_reduce_sum([float(values.get(k, 0.0)) for k in names]), strict=True))


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute the LLM's layer activations in backward (non-reentrant: gradients reach the projector through
    the frozen LLM's inputs). HF layers checkpoint only in training mode, hence `train()` on the LLM; r1v's
    models have no dropout, so that changes nothing else."""
    lm = model.model.language_model
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lm.train()


def all_reduce_max(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long, device=collective_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- non-finite steps


class NonFiniteStepError(NotRetryable):
    """A stage skipped more non-finite optimizer steps than `TrainerConfig.max_nonfinite_steps` allows, or its
    parameters stopped being finite."""


@dataclass
class StepOutcome:
    """What `guarded_step` did: the global gradient norm it checked, and what was not finite (on some rank)
    when it skipped the step ("loss", "grad norm", "loss and grad norm"; None when the step was taken)."""

    loss: float
    grad_norm: float
    nonfinite: str | None = None

    @property
    def skipped(self) -> bool:
        return self.nonfinite is not None


def grad_norm(engine) -> float:
    """The L2 norm of the trainable parameters' gradients of the window just backpropagated (before
    `engine.step()`), over all ranks: DeepSpeed's own pre-clipping norm. Every rank must call it.

    ZeRO-3 holds each rank's partition of the reduced gradients: their squares are summed over ranks. ZeRO-1/2
    hand out the full reduced gradient (a gather per parameter), ZeRO-0 has it in `.grad` on every rank.
    """
    squares: list[torch.Tensor] = []
    partitioned = False
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_local_grad

            g, partitioned = safe_get_local_grad(p), True
        elif p.grad is None and hasattr(p, "_hp_mapping"):
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad
        if g is not None:
            squares.append(torch.linalg.vector_norm(g.detach(), dtype=torch.float64) ** 2)
    total = float(torch.stack(squares).sum()) if squares else 0.0  # one device sync, not one per parameter
    if partitioned:
        (total,) = all_reduce_sum([total])
    return math.sqrt(total)


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _without_update(engine) -> Iterator[None]:
    """`engine.step()` inside changes no parameter, optimizer state or learning rate.

    DeepSpeed changes parameters only through its torch optimizer's `step` at every ZeRO stage (ZeRO-1..3 then
    copy their fp32 master partitions, unchanged, back to the parameters), and the schedule only through the LR
    scheduler's `step`: with both held, `engine.step()` still does its own clean-up of the window (reduced
    gradients in buckets and partitions, accumulation counters), which differs between stages and versions and
    which dropping `.grad` alone would miss (ZeRO-3 would add the next window's gradients to this one's). r1v
    configures no optimizer offload, whose partly-GPU variant steps a second (backup) optimizer.
    """
    held = [o for o in (engine.basic_optimizer, engine.lr_scheduler) if o is not None]
    saved = [o.__dict__.get("step", _no_step) for o in held]  # torch's LR scheduler wraps `step` per instance
    for o in held:
        o.step = _no_step
    try:
        yield
    finally:
        for o, prev in zip(held, saved, strict=True):
            if prev is _no_step:
                del o.step
            else:
                o.step = prev


def guarded_step(engine, loss: float) -> StepOutcome:
    """`engine.step()` when `loss` and the global gradient norm are finite on every rank, else a skipped step:
    the window's gradients are dropped and parameters, optimizer state and LR schedule stay as they were. All
    ranks agree (the flags are all-reduced), so they take the same collectives. Every rank must call it.

    With fp16, gradients are loss-scaled and an overflow is DeepSpeed's to handle (it skips the step and lowers
    the scale): only the loss is checked there.
    """
    norm = grad_norm(engine)
    fp16 = bool(getattr(engine, "fp16_enabled", lambda: False)())
    bad_loss, bad_norm = all_reduce_sum([float(not math.isfinite(loss)), float(not (fp16 or math.isfinite(norm)))])
    what = " and ".join(w for w, bad in (("loss", bad_loss), ("grad norm", bad_norm)) if bad) or None
    if what is None:
        engine.step()
    elif hasattr(engine, "basic_optimizer"):
        with _without_update(engine):
            engine.step()
    else:  # not a DeepSpeed engine (a single-process stand-in): its gradients live in `.grad`
        for p in engine.module.parameters():
            p.grad = None
    return StepOutcome(loss, norm, what)


class NonFiniteGuard:
    """Counts a stage's skipped (non-finite) optimizer steps since it (re)started, and fails it once more than
    `limit` were skipped."""

    def __init__(self, limit: int, stage: str) -> None:
        self.limit, self.stage, self.skipped = limit, stage, 0

    def record(self, out: StepOutcome, where: str) -> None:
        """Count `out` if it was skipped; raise `NonFiniteStepError` naming `where` past the limit."""
        if not out.skipped:
            return
        self.skipped += 1
        detail = f"non-finite {out.nonfinite} (loss {out.loss:.4g}, grad norm {out.grad_norm:.4g})"
        if self.skipped > self.limit:
            raise NonFiniteStepError(
                f"{self.stage} {where}: {detail}; {self.skipped} non-finite optimizer steps skipped, more than "
                f"trainer.max_nonfinite_steps = {self.limit}: stopping (checkpoints hold the last finite state)")
        print(f"[{self.stage}] {where}: {detail}: optimizer step skipped ({self.skipped} of at most {self.limit})",
              flush=True)


def params_finite(engine) -> bool:
    """Whether every trainable parameter is finite on every rank (each rank checks its ZeRO-3 partition).
    Every rank must call it."""
    bad = any(not bool(torch.isfinite(getattr(p, "ds_tensor", p.detach())).all())
              for p in engine.module.parameters() if p.requires_grad)
    return all_reduce_max(int(bad)) == 0
