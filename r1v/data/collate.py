"""Preprocessed rows -> padded torch batches (right padding for training, pixel tiles concatenated in order)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE = -100


def tiles_from_bytes(data: bytes, n_tiles: int, tile_size: int) -> np.ndarray:
    """A preprocessed row's uint8 tiles [n, 3, T, T] (normalised later, next to the model)."""
    expected = n_tiles * 3 * tile_size * tile_size
    if len(data) != expected:
        raise ValueError(f"pixel bytes hold {len(data)} values, expected {n_tiles} tiles of {tile_size}px "
                         f"({expected}): was the row preprocessed for another model?")
    return np.frombuffer(data, dtype=np.uint8).reshape(n_tiles, 3, tile_size, tile_size)


def collate_sft(rows: list[dict[str, Any]], pad_id: int, tile_size: int) -> dict[str, torch.Tensor | None]:
    """Pad to the longest row; uint8 tiles of all rows concatenated in row order (= IMG_CONTEXT order)."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    tiles = []
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        mask[i, :n] = 1
        if r["n_tiles"]:
            tiles.append(tiles_from_bytes(r["pixel_values"], r["n_tiles"], tile_size))
    pixel_values = torch.from_numpy(np.concatenate(tiles)) if tiles else None
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


def table_rows(table) -> list[dict[str, Any]]:
    """Rows of a preprocessed Arrow batch as dicts; `pixel_values` are zero-copy views of the Arrow buffer and
    `input_ids` / `labels` zero-copy int32 arrays.

    Why: `Table.to_pylist()` copies every row's tiles (MBs at 448 px) into a Python bytes object, and every
    token into a Python int, only for collate to copy them again into one array; views cost nothing.
    """
    views = [c for c in ("pixel_values", "input_ids", "labels") if c in table.column_names]
    rows = table.drop_columns(views).to_pylist()
    for name in views:
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise ValueError(f"{name} has nulls: not a preprocessed batch")
        if name == "pixel_values":
            lo = column.offset
            offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[lo : lo + len(column) + 1]
            data = column.buffers()[2]
            values = memoryview(data) if data is not None else memoryview(b"")
        else:
            offsets = column.offsets.to_numpy()
            values = column.values.to_numpy(zero_copy_only=False)  # a copy only for odd types (null)
        for row, start, end in zip(rows, offsets[:-1], offsets[1:], strict=True):
            row[name] = values[start:end]
    return rows
