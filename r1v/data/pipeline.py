"""Corpus rows -> model inputs, as Ray Data tasks; broken rows become quarantine records, never exceptions.

A preprocessed row carries `error` (a reason code, "" when fine). Training skips and counts error rows and
writes them to the quarantine Parquet, so rows in == rows trained + rows quarantined holds for every epoch.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r1v.config import PreprocessConfig
from r1v.data.schema import QUARANTINE_SCHEMA

PREPROCESSED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("pixel_values", pa.binary()),
        ("n_tiles", pa.int32()),
        ("answer", pa.string()),
        ("error", pa.string()),
        ("detail", pa.string()),
        ("source", pa.string()),
    ]
)


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@functools.lru_cache(maxsize=4)
def vision_geometry(model_dir: str) -> tuple[int, int]:
    """(tile_size, tokens_per_tile) read from the model's config, without loading weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    tile = cfg.vision_config.image_size
    tile = tile[0] if isinstance(tile, list | tuple) else tile
    patch = cfg.vision_config.patch_size
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    tokens = int((tile // patch) ** 2 * cfg.downsample_ratio**2)
    return int(tile), tokens


def encode_images(images: list[bytes], tile_size: int, pre: PreprocessConfig) -> tuple[np.ndarray | None, list[int]]:
    """Decode and tile every image of a row: float32 [total tiles, 3, T, T] in image order, and tiles per image.

    Uses the uint8 tile path (`tile_array` + `normalize_array`): the same pixels as `dynamic_tiles` +
    `normalize`, without per-tile PIL crops and float temporaries, which cost more than the resize did.
    """
    from r1v.model.tiling import load_image, normalize_array, tile_array

    arrays, counts = [], []
    for data in images:
        tiles = tile_array(load_image(data), tile_size=tile_size, max_tiles=pre.max_tiles,
                           use_thumbnail=pre.use_thumbnail)
        arrays.append(tiles)
        counts.append(len(tiles))
    if not arrays:
        return None, counts
    stacked = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return normalize_array(stacked), counts


class RowError(Exception):
    """A row-level problem with a reason code for the quarantine."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def preprocess_row(row: dict[str, Any], model_dir: str, pre: PreprocessConfig, with_labels: bool = True
                   ) -> dict[str, Any]:
    """Decode, tile, tokenise one corpus row. Raises RowError with a reason code on bad input."""
    from r1v.data.prompt import encode_prompt, encode_sft

    tok = load_tokenizer(model_dir)
    tile, per_tile = vision_geometry(model_dir)
    messages = [dict(m) for m in row["messages"] or []]
    if not messages:
        raise RowError("no_messages", "the row has no messages")
    try:
        pixels, counts = encode_images(list(row["images"] or []), tile, pre)
    except ValueError as e:
        raise RowError("image_decode", str(e)) from e
    try:
        if with_labels:
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                raise RowError("empty_assistant", "the last turn must be a non-empty assistant turn")
            enc = encode_sft(messages, tok, counts, per_tile, pre.max_length, system=pre.system_prompt)
            ids, labels = enc["input_ids"], enc["labels"]
        else:
            prompt_msgs = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            ids = encode_prompt(prompt_msgs, tok, counts, per_tile, system=pre.system_prompt)
            labels = []
            if len(ids) > pre.max_length:
                raise RowError("too_long", f"prompt has {len(ids)} tokens, max_length is {pre.max_length}")
    except RowError:
        raise
    except ValueError as e:
        reason = "too_long" if "max_length" in str(e) or "exceeds" in str(e) else "image_markers"
        raise RowError(reason, str(e)) from e
    return {"input_ids": ids, "labels": labels,
            "pixel_values": np.ascontiguousarray(pixels, np.float32).tobytes() if pixels is not None else b"",
            "n_tiles": int(sum(counts))}


def preprocess_batch(batch: pa.Table, model_dir: str, pre: dict[str, Any], with_labels: bool = True) -> pa.Table:
    """Ray Data map_batches function: never raises for a bad row, marks it with `error` instead."""
    cfg = PreprocessConfig.model_validate(pre)
    out = []
    for row in batch.to_pylist():
        rec = {"id": row["id"], "answer": row.get("answer") or "", "source": row.get("source") or "",
               "error": "", "detail": "", "input_ids": [], "labels": [], "pixel_values": b"", "n_tiles": 0}
        try:
            rec.update(preprocess_row(row, model_dir, cfg, with_labels))
        except RowError as e:
            rec.update(error=e.reason, detail=e.detail[:500])
        out.append(rec)
    return pa.Table.from_pylist(out, schema=PREPROCESSED_SCHEMA)


def preprocessed_dataset(corpus: str, model_dir: str, pre: PreprocessConfig, with_labels: bool = True):
    """A lazy Ray Dataset of preprocessed rows (order preserved so that resume can skip consumed rows)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet(str(corpus), columns=["id", "images", "messages", "answer", "source"])
    return ds.map_batches(preprocess_batch, batch_format="pyarrow", batch_size=16,
                          fn_kwargs={"model_dir": model_dir, "pre": pre.model_dump(), "with_labels": with_labels})


def write_quarantine(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write quarantined rows (id, reason, detail, source) atomically as one Parquet file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: r.get(k, "") for k in QUARANTINE_SCHEMA.names} for r in rows],
                                 schema=QUARANTINE_SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
