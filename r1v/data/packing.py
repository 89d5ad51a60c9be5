"""Token-budget batching and sequence packing for SFT, with samples kept from attending to each other.

Why: R1V samples differ wildly in length (256 image tokens per tile, 1 to 13 tiles, reasoning chains of any
length), so padding every row of a micro-batch to its longest wastes most of the compute. Packing puts several
samples into one row up to a token budget; each sample must still see only itself, or the loss would differ
from training the samples one by one.

How samples are kept apart (transformers 5.23, checked on CPU, sdpa and eager: tests/data/test_packing.py):

- Default: `attention_mask=None` and `position_ids` restarting at 0 for every sample. transformers' mask code
  (`masking_utils.find_packed_sequence_indices`) detects the restarts and builds a block-diagonal causal mask
  for sdpa and eager, and flash-attention uses them for its variable-length kernel. O(L) to ship, nothing
  quadratic built by us. CAVEAT: the detection is skipped when a KV cache exists, and
  `InternVLForConditionalGeneration.forward` creates one unless `use_cache=False`: called with the default,
  it silently lets samples attend to each other. `packed_logits` (via `multimodal_logits`) passes
  `use_cache=False`; a direct `model(...)` / `engine(...)` call must pass it too.
- `mask="4d"`: an explicit additive float mask [B, 1, L, L] (0 = attend, dtype min = blocked), which
  transformers passes through untouched whatever the cache. It must be float: eager *adds* the mask to the
  scores, so a boolean mask is silently wrong there (True adds 1.0). Quadratic in L: tests and short contexts.

Pad tokens at the end of a packed row form their own segment (positions restart at 0 there too): every query
then has at least itself to attend to, so no softmax row is empty (NaN), and their labels are -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from r1v.data.collate import IGNORE, tiles_from_bytes


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of row indices, each bin's total length <= max_tokens (first-fit decreasing).

    A row longer than the budget gets a bin of its own rather than being dropped: dropping would break the
    pipeline's invariant rows in = rows trained + rows quarantined. Within a bin, indices are ascending (input
    order), and bins come in order of their first row, so the result is deterministic for given lengths.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must be non-negative")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            bins.append([i])
            room.append(-1)  # closed: nothing else fits beside an over-budget row
            continue
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def collate_packed(
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    tile_size: int,
    max_tokens: int,
    *,
    mask: Literal["position_ids", "4d"] = "position_ids",
) -> dict[str, Any]:
    """Pack preprocessed rows into one sequence per token-budget bin; returns torch tensors plus bookkeeping.

    Keys: `input_ids`, `labels`, `position_ids` [B, L] (L = the longest bin, right-padded with `pad_id`);
    `sample_index` [B, L] (index into `rows` of each token's sample, -1 on padding: per-sample losses);
    `attention_mask` (None, or the 4D float mask for mask="4d"); `pixel_values` [sum n_tiles, 3, T, T] in
    IMG_CONTEXT order (bins in order, samples in bin order) or None; `bins` (row indices of each packed row).

    The first label of every sample is set to -100: with next-token shifting it would otherwise be predicted
    from the previous sample's last token. A sample's first token never has a label when run alone either, so
    per-sample losses are unchanged.
    """
    if not rows:
        raise ValueError("no rows to collate")
    lengths = [len(r["input_ids"]) for r in rows]
    if min(lengths) == 0:
        raise ValueError("a row has no input_ids (quarantined rows must be filtered out before packing)")
    bins = token_budget_batches(lengths, max_tokens)
    longest = max(sum(lengths[i] for i in b) for b in bins)
    ids = np.full((len(bins), longest), pad_id, dtype=np.int64)
    labels = np.full((len(bins), longest), IGNORE, dtype=np.int64)
    pos = np.zeros((len(bins), longest), dtype=np.int64)
    sample = np.full((len(bins), longest), -1, dtype=np.int64)
    tiles: list[np.ndarray] = []
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            r, n = rows[i], lengths[i]
            if len(r["labels"]) != n:
                raise ValueError(f"row {i}: {len(r['labels'])} labels for {n} input_ids")
            ids[b, at : at + n] = r["input_ids"]
            labels[b, at : at + n] = r["labels"]
            labels[b, at] = IGNORE
            pos[b, at : at + n] = np.arange(n)
            sample[b, at : at + n] = i
            at += n
            if r["n_tiles"]:
                tiles.append(tiles_from_bytes(r["pixel_values"], r["n_tiles"], tile_size))
        pos[b, at:] = np.arange(longest - at)  # the padding tail: a segment of its own
    sample_t = torch.from_numpy(sample)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos),
        "sample_index": sample_t,
        "attention_mask": block_causal_mask(sample_t) if mask == "4d" else None,
        "pixel_values": torch.from_numpy(np.concatenate(tiles)) if tiles else None,
        "bins": bins,
    }


def block_causal_mask(sample_index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: a token sees earlier tokens of its own sample, padding earlier padding.

    Float, not bool, because eager attention adds the mask to the scores (a bool mask would add 1.0).
    """
    seg = sample_index
    same = seg[:, :, None] == seg[:, None, :]
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    allowed = (same & causal).unsqueeze(1)
    out = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_logits(
    model: Any,
    batch: dict[str, Any],
    projector: torch.nn.Module | None = None,
    *,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, L, V] of a `collate_packed` batch through `multimodal_logits` (which sets use_cache=False).

    `projector` / `features` work as in `multimodal_logits` (reference projector, cached vision features).
    """
    # imported on use, to keep transformers, pyarrow, PIL out of light paths
    from r1v.model.forward import multimodal_logits

    mask = batch["attention_mask"]
    if mask is not None and mask.is_floating_point():
        mask = mask.to(model.dtype)  # sdpa wants a float mask in the query's dtype
    pixels = batch["pixel_values"] if features is None else None
    return multimodal_logits(
        model,
        batch["input_ids"],
        mask,
        pixels,
        projector,
        features=features,
        position_ids=batch["position_ids"],
    )


def per_sample_nll(
    logits: torch.Tensor, batch: dict[str, Any], n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and labelled-token count per original row ([n_rows] each).

    For logging per-sample losses and for checks; the SFT objective itself is `token_nll` on the packed
    batch, which already equals the sum over samples because labels never cross a sample boundary.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    owner = batch["sample_index"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    keep = (shift_labels.reshape(-1) != IGNORE) & (owner.reshape(-1) >= 0)
    idx = owner.reshape(-1)[keep]
    sums = torch.zeros(n_rows, dtype=nll.dtype).index_add_(0, idx, nll[keep])
    counts = torch.zeros(n_rows, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx))
    return sums, counts


def padding_fraction(
    lengths: Sequence[int],
    groups: Sequence[Sequence[int]],
    mode: Literal["padded", "packed"],
    pad_to: int | None = None,
) -> float:
    """Fraction of token slots that are padding: the compute a batching scheme wastes.

    mode="padded": each group is a plain batch, every row padded to the group's longest (or `pad_to`), as
    `collate_sft` does. mode="packed": each group is a bin packed into one row, and all bins are padded to the
    longest bin (or `pad_to`), as one `collate_packed` call over them does.
    """
    if mode == "padded":
        widths = [max((lengths[i] for i in g), default=0) for g in groups]  # longest row of each batch
        counts = [len(g) for g in groups]
    elif mode == "packed":
        widths = [sum(lengths[i] for i in g) for g in groups]  # each bin is one row
        counts = [1] * len(groups)
        longest = max(widths, default=0)
        widths = [longest] * len(groups)
    else:
        raise ValueError(f"mode must be 'padded' or 'packed', got {mode!r}")
    if pad_to is not None:
        if max(widths, default=0) > pad_to:
            raise ValueError(f"pad_to={pad_to} is shorter than a {'row' if mode == 'padded' else 'bin'}")
        widths = [pad_to] * len(groups)
    real = sum(lengths[i] for g in groups for i in g)
    slots = sum(w * c for w, c in zip(widths, counts, strict=True))
    return 0.0 if slots == 0 else 1.0 - real / slots
