"""Supervised fine-tuning: Ray Data shards -> DeepSpeed ZeRO-3 engines on Ray Train workers.

Reads top to bottom: set up the worker, load and freeze the model, build the engine, restore a checkpoint if
there is one, then loop epochs -> micro-batches, checkpointing every N optimizer steps, and export at the end.

ZeRO-3 runs collectives inside every forward, so all ranks must take the same number of micro-steps and call
the vision tower every time: a rank whose shard ran dry (or whose rows were all quarantined) steps on a
zero-weight dummy row holding one blank tile.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from r1v.config import SFTConfig
from r1v.data.collate import IGNORE, collate_sft, table_rows
from r1v.data.packing import collate_packed, token_budget_batches
from r1v.model.forward import normalize_pixels
from r1v.train import checkpoint
from r1v.train.engine import all_reduce_max, all_reduce_sum, export_model, gather_objects, init_engine
from r1v.train.launch import setup_worker


def dummy_row(image_token_id: int, tokens_per_tile: int, tile_size: int) -> dict[str, Any]:
    """One blank tile and its context tokens, no labels: keeps a rank in step without training on anything."""
    blank = bytes(3 * tile_size * tile_size)  # one black uint8 tile
    return {"input_ids": [image_token_id] * tokens_per_tile, "labels": [IGNORE] * tokens_per_tile,
            "pixel_values": blank, "n_tiles": 1}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and how many there were."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                            shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, int((shift_labels != IGNORE).sum())


def _rows(shard, chunk: int) -> Iterator[dict[str, Any]]:
    for table in shard.iter_batches(batch_size=chunk, batch_format="pyarrow"):
        yield from table_rows(table)


def micro_batches(shard, c: SFTConfig, state: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """This rank's preprocessed rows (good and quarantined alike), one list per micro-step, resuming after
    what `state` records as consumed.

    Without packing a micro-step takes `batch_size` rows in stream order. With packing, `pack_buffer` rows at a
    time are grouped into token-budget bins (first-fit decreasing, one packed sequence each) and a micro-step
    takes `batch_size` bins; a buffer's bad rows ride with its first micro-step so they are counted. Resume
    skips the finished buffers, re-forms the current one (the same bins) and skips its finished micro-steps.
    """
    rows = _rows(shard, max(c.batch_size, 1 if not c.packing else min(c.pack_buffer, 64)))
    if not c.packing:
        skip = state["rows_consumed"]
        while chunk := list(itertools.islice(rows, c.batch_size)):
            if skip:  # resume: drop rows this rank consumed before the checkpoint
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
                if not chunk:
                    continue
            yield chunk
        return
    for _ in itertools.islice(rows, state["buffer_start"]):
        pass
    while buf := list(itertools.islice(rows, c.pack_buffer)):
        good = [r for r in buf if not r["error"]]
        bins = token_budget_batches([len(r["input_ids"]) for r in good], c.max_tokens)
        groups = [[good[i] for b in bins[k : k + c.batch_size] for i in b] for k in range(0, len(bins), c.batch_size)]
        groups = groups or [[]]
        groups[0] = [r for r in buf if r["error"]] + groups[0]
        for g, group in enumerate(groups):
            if g < state["groups_done"]:
                continue
            state["groups_done"] = g + 1
            yield group
        state["buffer_start"] += len(buf)
        state["groups_done"] = 0


def sft_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker function."""
    import ray.train

    from r1v.data.pipeline import vision_geometry
    from r1v.model.freeze import apply_freeze
    from r1v.model.io import load_model
    from r1v.tracking import RunLogger

    c = SFTConfig.model_validate(cfg["config"])
    rank, world = setup_worker(c.trainer)
    log = RunLogger(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else RunLogger(None, None)
    model, tok = load_model(c.model)
    counts = apply_freeze(model, c.trainable)
    tile, per_tile = vision_geometry(c.model)
    image_token = model.config.image_token_id
    # Shards are split dynamically (no row dropped), so their sizes are only known at the end: the step
    # count below sizes the LR schedule; an epoch ends when every shard is exhausted.
    # With packing the rows per step are unknown up front: assume sequences of half the context on average.
    rows_per_micro = c.batch_size * (max(1, 2 * c.max_tokens // c.preprocess.max_length) if c.packing else 1)
    steps_per_epoch = math.ceil(cfg["rows"] / (world * rows_per_micro * c.grad_accum))
    total = min(c.max_steps or 10**12, steps_per_epoch * c.epochs)
    limit = c.max_steps or 10**12
    engine = init_engine(model, c.trainer, c.optim, total, c.batch_size, c.grad_accum)
    state = checkpoint.restore(engine, rank) or {"step": 0, "epoch": 0, "rows_consumed": 0, "micro": 0,
                                                  "trained": 0, "quarantined": [], "buffer_start": 0,
                                                  "groups_done": 0}
    if rank == 0:
        log.params({"trainable_params": counts, "total_steps": total})
        print(f"[sft] rank0: trainable {counts}; ~{total} optimizer steps; starting at step {state['step']}")
        if state["step"]:
            log.tags({"r1v.resumed_from_step": str(state["step"])})
    shard = ray.train.get_dataset_shard("train")
    t_last, tokens_since = time.time(), 0

    for epoch in range(state["epoch"], c.epochs):
        if state["step"] >= limit:
            break
        it = micro_batches(shard, c, state)
        while True:
            rows = next(it, None)
            if not all_reduce_max(int(rows is not None)):
                break  # every rank's shard is exhausted
            good: list[dict[str, Any]] = []
            for r in rows or []:
                if r["error"]:
                    state["quarantined"].append({"id": r["id"], "reason": r["error"], "detail": r["detail"],
                                                 "source": r["source"]})
                else:
                    good.append(r)
            state["rows_consumed"] += len(rows or [])
            state["trained"] += len(good)
            if not any(r["n_tiles"] for r in good):  # keep the vision tower in every forward (ZeRO-3)
                good.append(dummy_row(image_token, per_tile, tile))
            if c.packing:
                batch = collate_packed(good, tok.pad_token_id, tile, c.max_tokens)
                out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                             pixel_values=normalize_pixels(batch["pixel_values"], engine.module.dtype))
            else:
                batch = collate_sft(good, tok.pad_token_id, tile)
                out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=normalize_pixels(batch["pixel_values"], engine.module.dtype))
            nll, n_tok = token_nll(out.logits, batch["labels"])
            g_nll, g_tok = all_reduce_sum([float(nll.detach()), float(n_tok)])
            # Mean over the *global* token count; DeepSpeed averages gradients over ranks, hence * world.
            loss = nll / max(g_tok, 1.0) * world
            engine.backward(loss)
            engine.step()
            state["micro"] += 1
            tokens_since += int(g_tok)
            if state["micro"] % c.grad_accum:
                continue
            state["step"] += 1
            step = state["step"]
            if rank == 0 and step % c.log_every == 0:
                now = time.time()
                log.metrics({"loss": g_nll / max(g_tok, 1), "lr": engine.get_lr()[0],
                             "tokens_per_s": tokens_since / max(now - t_last, 1e-9), "epoch": epoch}, step)
                t_last, tokens_since = now, 0
            if step % c.checkpoint_every == 0:
                checkpoint.save(engine, step, state, {"loss": g_nll / max(g_tok, 1)}, rank)
            if step >= limit:
                break
        _finish_epoch(state, epoch, rank, log, cfg["stage_dir"])
        state.update(epoch=epoch + 1, rows_consumed=0, trained=0, quarantined=[], buffer_start=0, groups_done=0)
        # An end-of-epoch checkpoint: a crash after this point never redoes (or recounts) the epoch.
        checkpoint.save(engine, state["step"], state, {"epoch": epoch}, rank, name=f"epoch-{epoch:03d}-end")

    export_model(engine, c.model, Path(cfg["stage_dir"]) / "model", rank)


def _finish_epoch(state: dict[str, Any], epoch: int, rank: int, log, stage_dir: str) -> None:
    """Reconcile rows in = trained + quarantined across ranks; rank 0 writes the quarantine and logs counts."""
    from r1v.data.schema import write_quarantine
    from r1v.fsutil import atomic_write_json

    parts = gather_objects({"consumed": state["rows_consumed"], "trained": state["trained"],
                            "quarantined": state["quarantined"]})
    if rank != 0:
        return
    consumed = sum(p["consumed"] for p in parts)
    trained = sum(p["trained"] for p in parts)
    bad = [q for p in parts for q in p["quarantined"]]
    by_reason: dict[str, int] = {}
    for q in bad:
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
    write_quarantine(bad, Path(stage_dir) / "quarantine" / f"epoch-{epoch}.parquet")
    summary = {"epoch": epoch, "rows_in": consumed, "rows_trained": trained, "rows_quarantined": len(bad),
               "quarantined_by_reason": by_reason}
    atomic_write_json(Path(stage_dir) / f"epoch-{epoch}-counts.json", summary)
    log.metrics({"rows_in": consumed, "rows_trained": trained, "rows_quarantined": len(bad)}, epoch)
    print(f"[sft] epoch {epoch}: {summary}")


def train_sft(c: SFTConfig, stage_dir: Path, tracking_uri: str | None, run_id: str | None) -> dict[str, Any]:
    """Driver side: build the Ray Data pipeline, run the workers (resuming if a checkpoint exists), check counts."""
    import pyarrow.dataset as pads

    from r1v.data.pipeline import preprocessed_dataset
    from r1v.fsutil import read_json
    from r1v.train.launch import fit

    rows = pads.dataset(c.corpus, format="parquet").count_rows()
    if rows == 0:
        raise ValueError(f"corpus {c.corpus} has no rows")
    ds = preprocessed_dataset(c.corpus, c.model, c.preprocess, with_labels=True)
    loop_cfg = {"config": c.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": run_id,
                "stage_dir": str(stage_dir), "rows": rows}
    fit(sft_loop, loop_cfg, c.trainer, stage_dir / "ray", c.keep_checkpoints, datasets={"train": ds})
    counts = [read_json(p) for p in sorted(stage_dir.glob("epoch-*-counts.json"))]
    for cnt in counts:
        if cnt["rows_in"] != rows and c.max_steps is None:
            raise RuntimeError(f"epoch {cnt['epoch']}: {cnt['rows_in']} rows reached the workers but the corpus "
                               f"has {rows}: rows were lost")
        if cnt["rows_in"] != cnt["rows_trained"] + cnt["rows_quarantined"]:
            raise RuntimeError(f"epoch {cnt['epoch']}: counts do not reconcile: {cnt}")
    return {"model": stage_dir / "model", "counts": counts, "rows": rows}
