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
