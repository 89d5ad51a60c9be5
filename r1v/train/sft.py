"""Supervised fine-tuning: Ray Data shards -> DeepSpeed ZeRO-3 engines on Ray Train workers.

Reads top to bottom: set up the worker, load and freeze the model, build the engine, restore a checkpoint if
there is one, then loop epochs -> accumulation windows of micro-batches, checkpointing every N optimizer steps,
and export at the end.

ZeRO-3 runs collectives inside every forward, so all ranks must take the same number of micro-steps and call
the vision tower every time: a rank whose shard ran dry (or whose rows were all quarantined) steps on a
zero-weight dummy row holding one blank tile.

Order and shards: epoch e visits the corpus in an order of global row indices (with `shuffle`, row groups in a
permutation seeded by (trainer seed, e); `r1v.data.pipeline.epoch_order`), every worker computes it from the
Parquet metadata, drops the rows the epoch already consumed (none unless resumed), and reads its balanced
contiguous share of the rest (`balanced_shard`: within one row of the others), preprocessing only those rows.
Each worker shuffles its rows within windows of `pack_buffer` rows with an rng seeded by (seed, e, rank,
segment, window). Checkpoints record the consumed rows by global index (`r1v.train.position`), so a resume, on
any number of workers, trains every remaining row once.

Loss: every label token of an accumulation window weighs the same, whichever micro-batch or rank holds it (see
`window_loss`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1v.core import storage
from r1v.core.fs import atomic_write_json, read_json
from r1v.data.collate import IGNORE, collate_sft, table_rows
from r1v.data.packing import collate_packed, token_budget_batches
from r1v.data.pipeline import balanced_shard, epoch_order, preprocessed_dataset, vision_geometry
from r1v.data.schema import write_quarantine
from r1v.model.forward import normalize_pixels
from r1v.train import checkpoint
from r1v.train.config import SFTConfig
from r1v.train.device import engine_device, engine_dtype, to_device
from r1v.train.engine import (
    NonFiniteGuard,
    NonFiniteStepError,
    StepOutcome,
    all_reduce_max,
    all_reduce_sum,
    export_model,
    guarded_step,
    init_engine,
    params_finite,
)
from r1v.train.launch import fetch_outputs, fit, publish, staged, worker_dir
from r1v.train.position import EpochRows
from r1v.train.projector_reg import ProjectorNormPenalty
from r1v.train.worker import load_trainable, start_worker, worker_progress


def dummy_row(image_token_id: int, tokens_per_tile: int, tile_size: int) -> dict[str, Any]:
    """One blank tile and its context tokens, no labels: keeps a rank in step without training on anything."""
    blank = bytes(3 * tile_size * tile_size)  # one black uint8 tile
    return {"input_ids": [image_token_id] * tokens_per_tile, "labels": [IGNORE] * tokens_per_tile,
            "pixel_values": blank, "n_tiles": 1}


def label_tokens(labels: torch.Tensor) -> int:
    """Labelled next-token targets in a batch: the tokens `token_nll` sums over."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and how many there were."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                            shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, label_tokens(labels)


def window_loss(nll_sum: torch.Tensor, window_tokens: float, world: int) -> torch.Tensor:
    """What one micro-batch backpropagates: its summed NLL over the label tokens of the whole window, on all ranks.

    Why: DeepSpeed averages gradients over ranks, and `backward_window` sums them over the window's micro-batches
    (no 1/gradient_accumulation_steps), so the step's gradient is that of (NLL summed over the window on every
    rank) / (label tokens of the window on every rank). A mean of per-micro-batch means would weigh a token of a
    short micro-batch (or of a rank with short rows) more than one of a long one.
    """
    return nll_sum / max(window_tokens, 1.0) * world


def batch_nll(engine, batch: dict[str, Any], packing: bool) -> torch.Tensor:
    """Summed label-token NLL of one collated micro-batch, moved to the engine's device first (pixels as uint8:
    they are normalised there, in the engine's dtype)."""
    batch = to_device(batch, engine_device(engine))
    pixels = normalize_pixels(batch["pixel_values"], engine_dtype(engine))
    if packing:
        out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     pixel_values=pixels)
    else:
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)
    return token_nll(out.logits, batch["labels"])[0]


def sft_step(engine, batches: Sequence[dict[str, Any]], packing: bool, world: int,
             penalty: ProjectorNormPenalty | None = None) -> tuple[float, float, StepOutcome]:
    """One optimizer step over one accumulation window of collated micro-batches: no Ray involved, so a Ray Train
    worker and a plain single process (`bench/gpu_step.py`) run the same step. Returns the window's (summed NLL,
    label tokens) over all ranks and the step's outcome: a window whose loss or gradient norm is not finite is
    skipped (`guarded_step`), the caller decides whether the stage goes on. With `penalty`, each micro-batch also
    backpropagates weight x its projector penalty x its label tokens (so the window's loss adds weight x the
    label-token-weighted mean penalty); the returned NLL stays the NLL."""

    def reg(b: dict[str, Any]) -> torch.Tensor | float:
        p = penalty.take()
        return 0.0 if p is None else penalty.weight * p * label_tokens(b["labels"])

    out = backward_window(engine, batches, lambda b: batch_nll(engine, b, packing),
                          [label_tokens(b["labels"]) for b in batches], world,
                          reg_fn=reg if penalty is not None else None)
    return (*out, guarded_step(engine, out[0] / max(out[1], 1.0)))


def backward_window(engine, batches: Sequence[Any], nll_fn: Callable[[Any], torch.Tensor], tokens: Sequence[int],
                    world: int, reg_fn: Callable[[Any], torch.Tensor | float] | None = None) -> tuple[float, float]:
    """Forward and backward every micro-batch of one accumulation window (the caller then calls `engine.step()`).

    `tokens[i]` is batch i's label-token count, known before its forward so the window's global count is one
    all-reduce. The accumulation boundary is set by hand, so a window may hold fewer micro-batches than
    gradient_accumulation_steps (the last one of an epoch). Every rank must pass the same number of batches
    (ZeRO-3 gathers parameters inside forward). Returns the window's (summed NLL, label tokens) over all ranks.
    `reg_fn(batch)`, called right after the batch's forward, adds a term (on the NLL's summed scale) to what is
    backpropagated, not to the NLL returned.
    """
    (g_tok,) = all_reduce_sum([float(sum(tokens))])
    nll_sum = 0.0
    for i, batch in enumerate(batches):
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        nll = nll_fn(batch)
        loss = nll if reg_fn is None else nll + reg_fn(batch)
        engine.backward(window_loss(loss, g_tok, world), scale_wrt_gas=False)
        nll_sum += float(nll.detach())
    (g_nll,) = all_reduce_sum([nll_sum])
    return g_nll, g_tok


def _rows(shard, chunk: int) -> Iterator[dict[str, Any]]:
    for table in shard.iter_batches(batch_size=chunk, batch_format="pyarrow"):
        yield from table_rows(table)


def window_size(c: SFTConfig) -> int:
    """Rows per window: `pack_buffer`, rounded up to whole micro-steps without packing."""
    return c.pack_buffer if c.packing else math.ceil(c.pack_buffer / c.batch_size) * c.batch_size


def window_rng(key: Sequence[int], window: int) -> np.random.Generator:
    """The rng of one window; `key` is (seed, epoch, rank). Seeds may be negative: SeedSequence wants >= 0."""
    return np.random.default_rng([k % 2**63 for k in (*key, window)])


def window_groups(buf: list[dict[str, Any]], c: SFTConfig, rng: np.random.Generator | None
                  ) -> list[list[dict[str, Any]]]:
    """One window's micro-steps. Without packing, `batch_size` rows each; with packing, `batch_size` token-budget
    bins each (first-fit decreasing), the window's bad rows riding with the first so that they are counted.

    With `rng`, the rows are shuffled first and, with packing, the micro-steps too (first-fit decreasing would
    otherwise order them longest first).
    """
    if rng is not None:
        buf = [buf[i] for i in rng.permutation(len(buf))]
    if not c.packing:
        return [buf[k : k + c.batch_size] for k in range(0, len(buf), c.batch_size)]
    good = [r for r in buf if not r["error"]]
    bins = token_budget_batches([len(r["input_ids"]) for r in good], c.max_tokens)
    groups = [[good[i] for b in bins[k : k + c.batch_size] for i in b] for k in range(0, len(bins), c.batch_size)]
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    groups = groups or [[]]
    groups[0] = [r for r in buf if r["error"]] + groups[0]
    return groups


def micro_batches(shard, c: SFTConfig, key: Sequence[int] | None = None) -> Iterator[list[dict[str, Any]]]:
    """This rank's preprocessed rows (good and quarantined alike), one list per micro-step.

    The stream is cut into windows of `window_size` rows, each cut into micro-steps by `window_groups`, shuffled
    with `window_rng(key, window index)` when `key` (seed, epoch, rank, segment) is given.
    """
    size = window_size(c)
    rows = _rows(shard, min(size, 64))
    window = 0
    while buf := list(itertools.islice(rows, size)):
        yield from window_groups(buf, c, window_rng(key, window) if key is not None else None)
        window += 1


def epoch_seed(c: SFTConfig, epoch: int) -> list[int] | None:
    """The seed of epoch `epoch`'s row-group order (None: corpus order)."""
    return [c.trainer.seed % 2**63, epoch] if c.shuffle else None


def rank_rows(c: SFTConfig, epoch: int, seen: EpochRows, rank: int, world: int):
    """This rank's rows of `epoch` not consumed yet, as a Ray Dataset of preprocessed rows."""
    mine = balanced_shard(seen.remaining(epoch_order(c.corpus, epoch_seed(c, epoch))), world, rank)
    return preprocessed_dataset(c.corpus, c.model, c.preprocess, with_labels=True, seed=epoch_seed(c, epoch),
                                rows=mine)


def sft_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker function."""
    c = staged(SFTConfig.model_validate(cfg["config"]))
    out = worker_dir(cfg)
    t_setup = time.time()
    rank, world, log = start_worker(c.trainer, cfg["tracking_uri"], cfg["run_id"])
    model, tok, counts = load_trainable(c.model, c.trainer, c.trainable)
    tile, per_tile = vision_geometry(c.model)
    image_token = model.config.image_token_id
    # The step count below sizes the LR schedule; an epoch ends when every shard is exhausted.
    # With packing the rows per step are unknown up front: assume sequences of half the context on average.
    rows_per_micro = c.batch_size * (max(1, 2 * c.max_tokens // c.preprocess.max_length) if c.packing else 1)
    grad_accum = c.accumulation(world)
    steps_per_epoch = math.ceil(cfg["rows"] / (world * rows_per_micro * grad_accum))
    total = min(c.max_steps or 10**12, steps_per_epoch * c.epochs)
    limit = c.max_steps or 10**12
    engine = init_engine(model, c.trainer, c.optim, total, c.batch_size, grad_accum)
    penalty = ProjectorNormPenalty(model, c.projector_norm_reg) if c.projector_norm_reg > 0 else None
    portable = checkpoint.portable(c.trainable, c.trainer)
    restored = checkpoint.restore(engine, rank, portable=portable)
    state = restored.state if restored else {"step": 0, "epoch": 0, "micro": 0}
    seen = EpochRows(cfg["rows"], rank, state.get("rows"), restored.arrays if restored else None)

    def save(metrics: dict[str, float], name: str | None = None) -> None:
        seen.merge()  # every rank's rows since the last checkpoint, to rank 0
        checkpoint.save(engine, state["step"], {**state, "rows": seen.state()}, metrics, rank, portable=portable,
                        name=name, arrays=seen.arrays())

    if rank == 0:
        log.params({"trainable_params": counts, "total_steps": total})
        print(f"[sft] rank0: trainable {counts}; ~{total} optimizer steps; starting at step {state['step']} "
              f"(set up in {time.time() - t_setup:.1f} s)", flush=True)
        if state["step"]:
            log.tags({"r1v.resumed_from_step": str(state["step"])})
    t_last, tokens_since = time.time(), 0
    guard = NonFiniteGuard(c.trainer.max_nonfinite_steps, "sft")
    progress = worker_progress(cfg, rank, log)

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        good = seen.count(rows)
        if not any(r["n_tiles"] for r in good):  # keep the vision tower in every forward (ZeRO-3)
            good.append(dummy_row(image_token, per_tile, tile))
        if c.packing:
            return collate_packed(good, tok.pad_token_id, tile, c.max_tokens)
        return collate_sft(good, tok.pad_token_id, tile)

    for epoch in range(state["epoch"], c.epochs):
        if state["step"] >= limit:
            break
        shard = rank_rows(c, epoch, seen, rank, world)
        it = micro_batches(shard, c, (c.trainer.seed, epoch, rank, seen.segment) if c.shuffle else None)
        while True:
            window = list(itertools.islice(it, grad_accum))
            n = all_reduce_max(len(window))
            if not n:
                break  # every rank's shard is exhausted
            # The window's micro-batches are formed first: its global token count normalises every one of them.
            batches = [collate(rows) for rows in window + [[]] * (n - len(window))]
            g_nll, g_tok, outcome = sft_step(engine, batches, c.packing, world, penalty)
            state["micro"] += n
            state["step"] += 1
            step = state["step"]
            # Past the limit this raises on every rank (they agree on the flags), before anything is saved.
            guard.record(outcome, f"step {step}")
            tokens_since += int(g_tok)
            progress.update(step, total, loss=g_nll / max(g_tok, 1), epoch=epoch)
            if rank == 0 and step % c.log_every == 0:
                now = time.time()
                log.metrics({"loss": g_nll / max(g_tok, 1), "lr": engine.get_lr()[0],
                             "tokens_per_s": tokens_since / max(now - t_last, 1e-9), "epoch": epoch,
                             "grad_norm": outcome.grad_norm, "nonfinite_steps": guard.skipped,
                             **({"projector_norm_ratio": penalty.last_ratio} if penalty else {})}, step)
                t_last, tokens_since = now, 0
            if step % c.checkpoint_every == 0:
                _check_finite(engine, step)
                save({"loss": g_nll / max(g_tok, 1)})
            if step >= limit:
                break
        if rank == 0:
            print(f"[sft] rank0: epoch {epoch} trained to step {state['step']} at {time.time() - t_setup:.1f} s",
                  flush=True)
        _finish_epoch(seen, epoch, log, str(out))
        if rank == 0:
            for rel in ("quarantine/epoch-{}.parquet", "epoch-{}-rows.parquet", "epoch-{}-counts.json"):
                publish(cfg, rel.format(epoch))
        state.update(epoch=epoch + 1)
        seen = EpochRows(cfg["rows"], rank)
        # An end-of-epoch checkpoint: a crash after this point never redoes (or recounts) the epoch.
        _check_finite(engine, state["step"])
        save({"epoch": epoch}, name=f"epoch-{epoch:03d}-end")

    progress.flush()  # the last step, which an estimated total may not have reached
    t_export = time.time()
    export_model(engine, c.model, out / "model", rank)
    if rank == 0:
        publish(cfg, "model")
    if rank == 0:
        print(f"[sft] rank0: model exported in {time.time() - t_export:.1f} s ({time.time() - t_setup:.1f} s in "
              "all)", flush=True)


def _check_finite(engine, step: int) -> None:
    """Refuse to checkpoint non-finite weights: skipped steps keep them finite, so this only fires on a finite
    update that overflowed; the checkpoints already kept are then the last good ones (Ray keeps the newest)."""
    if not params_finite(engine):
        raise NonFiniteStepError(f"sft step {step}: trainable parameters are not finite after the optimizer step; "
                                 "not checkpointing them")


def _finish_epoch(seen: EpochRows, epoch: int, log, stage_dir: str) -> None:
    """Reconcile rows in = trained + quarantined across ranks (and any earlier worker group of the epoch); rank 0
    writes the quarantine, the epoch's consumed rows (`epoch-E-rows.parquet`: global index, rank, segment) and
    the counts. Every rank calls it (it gathers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen.merge()
    if seen.rank != 0:
        return
    consumed, trained, bad = len(seen.rows), seen.trained, seen.quarantined
    by_reason: dict[str, int] = {}
    for q in bad:
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
    write_quarantine(bad, Path(stage_dir) / "quarantine" / f"epoch-{epoch}.parquet")
    pq.write_table(pa.table({"row": seen.rows, "rank": seen.ranks, "segment": seen.segments}),
                   Path(stage_dir) / f"epoch-{epoch}-rows.parquet")
    summary = {"epoch": epoch, "rows_in": consumed, "rows_trained": trained, "rows_quarantined": len(bad),
               "rows_distinct": len(np.unique(seen.rows)), "quarantined_by_reason": by_reason}
    atomic_write_json(Path(stage_dir) / f"epoch-{epoch}-counts.json", summary)
    log.metrics({"rows_in": consumed, "rows_trained": trained, "rows_quarantined": len(bad)}, epoch)
    print(f"[sft] epoch {epoch}: {summary}")


def train_sft(c: SFTConfig, stage_dir: Path, tracking_uri: str | None, run_id: str | None,
              stage_uri: str | None = None) -> dict[str, Any]:
    """Driver side: build the Ray Data pipeline, run the workers (resuming if a checkpoint exists), check counts.
    With `stage_uri` (an object-store run root) the workers write the model, counts and checkpoints there."""
    import pyarrow.dataset as pads


    rows = pads.dataset(c.corpus, format="parquet").count_rows()
    if rows == 0:
        raise ValueError(f"corpus {c.corpus} has no rows")
    c.accumulation(c.trainer.num_workers)  # a global_batch the workers cannot split fails here, before Ray
    # Each worker reads its own rows (`rank_rows`): which ones depends on what the checkpoint it resumes from
    # records, known only there.
    loop_cfg = {"config": c.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                "stage_dir": str(stage_dir), "stage_uri": stage_uri, "rows": rows}
    fit(sft_loop, loop_cfg, c.trainer, stage_dir / "ray", c.keep_checkpoints)
    fetch_outputs(stage_uri, stage_dir, lambda rel: rel.startswith(("epoch-", "quarantine/")))
    counts = [read_json(p) for p in sorted(stage_dir.glob("epoch-*-counts.json"))]
    for cnt in counts:
        if cnt["rows_in"] != rows and c.max_steps is None:
            raise RuntimeError(f"epoch {cnt['epoch']}: {cnt['rows_in']} rows reached the workers but the corpus "
                               f"has {rows}: rows were lost")
        if cnt["rows_in"] != cnt["rows_trained"] + cnt["rows_quarantined"]:
            raise RuntimeError(f"epoch {cnt['epoch']}: counts do not reconcile: {cnt}")
        if cnt.get("rows_distinct", cnt["rows_in"]) != cnt["rows_in"]:
            raise RuntimeError(f"epoch {cnt['epoch']}: a row was trained more than once: {cnt}")
    model = storage.join(stage_uri, "model") if stage_uri else stage_dir / "model"
    return {"model": model, "counts": counts, "rows": rows}
