"""Corpus rows -> model inputs, as Ray Data tasks; broken rows become quarantine records, never exceptions.

A preprocessed row carries `error` (a reason code, "" when fine). Training skips and counts error rows and
writes them to the quarantine Parquet, so rows in == rows trained + rows quarantined holds for every epoch.
A preprocessed row also carries `row`, its global index in the corpus (`r1v.data.reader`; -1 when read without
one): SFT's data position and its balanced shards are kept in those indices, so they do not depend on the number
of workers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from r1v.core.config import PreprocessConfig
from r1v.model.tokens import IMG_CONTEXT, IMG_END, IMG_START

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
        ("row", pa.int64()),
    ]
)


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@functools.lru_cache(maxsize=4)
def vision_geometry(model_dir: str) -> tuple[int, int]:
    """(tile_size, tokens_per_tile) read from the model's config, without loading weights."""
    # imported on use, to keep torch, transformers, PIL out of light paths
    from transformers import AutoConfig

    from r1v.model.assemble import num_image_tokens, tile_size

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return tile_size(cfg), num_image_tokens(cfg)


@functools.lru_cache(maxsize=4)
def _context_run_splits(model_dir: str) -> bool:
    """Whether a run of k `<IMG_CONTEXT>` tokens tokenises as k copies of the one-token run's id.

    True for any tokenizer where `<IMG_CONTEXT>` is an added token (InternVL's, R1V's, the tiny one), since
    added tokens are split out before the model sees the text. Then `preprocess_row` tokenises a prompt with
    one context token per image and repeats it afterwards: the same ids, without tokenising ~256 tokens per
    tile (1.3 ms of 1.9 ms for a 5-tile row). Checked once per tokenizer, else the direct path is used.
    """
    tok = load_tokenizer(model_dir)
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)

    def ids(k: int) -> list[int]:
        return tok(f"a {IMG_START}{IMG_CONTEXT * k}{IMG_END}\nb", add_special_tokens=False)["input_ids"]

    one, three = ids(1), ids(3)
    if one.count(ctx) != 1:
        return False
    at = one.index(ctx)
    return three == one[:at] + [ctx] * 3 + one[at + 1 :]


def _expand_context(ids: list[int], labels: list[int], runs: list[int], ctx: int) -> tuple[list[int], list[int]]:
    """Replace the i-th context token (one per image) by runs[i] copies, its label copied alike."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    at = 0
    positions = [i for i, t in enumerate(ids) if t == ctx]
    if len(positions) != len(runs):
        raise AssertionError(f"{len(positions)} context tokens for {len(runs)} images")
    for pos, n in zip(positions, runs, strict=True):
        out_ids += ids[at:pos]
        out_ids += [ctx] * n
        if labels:
            out_labels += labels[at:pos]
            out_labels += [labels[pos]] * n
        at = pos + 1
    out_ids += ids[at:]
    out_labels += labels[at:] if labels else []
    return out_ids, out_labels


class RowError(Exception):
    """A row-level problem with a reason code for the quarantine."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class EncodedRow:
    """A row tokenised, its images decoded but not yet tiled; `write_tiles` resizes them into a buffer."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any]  # decoded RGB PIL images, in marker order
    tiles_per_image: list[int]
    tile_size: int
    pre: PreprocessConfig

    @property
    def n_tiles(self) -> int:
        return sum(self.tiles_per_image)

    def write_tiles(self, out: np.ndarray) -> None:
        """Tile every image into `out` (uint8 [n_tiles, 3, T, T], C-contiguous), then drop the decoded images."""
        # imported on use, to keep PIL out of light paths
        from r1v.model.tiling import tile_array

        at = 0
        for image, n in zip(self.images, self.tiles_per_image, strict=True):
            tile_array(image, tile_size=self.tile_size, max_tiles=self.pre.max_tiles,
                       use_thumbnail=self.pre.use_thumbnail, out=out[at : at + n])
            at += n
        self.images = []

    def pixel_bytes(self) -> bytes:
        out = np.empty((self.n_tiles, 3, self.tile_size, self.tile_size), dtype=np.uint8)
        self.write_tiles(out)
        return out.tobytes()


def encode_row(row: dict[str, Any], model_dir: str, pre: PreprocessConfig, with_labels: bool = True) -> EncodedRow:
    """Decode the images and tokenise one corpus row. Raises RowError with a reason code on bad input.

    Tiling (the resizes, ~85% of the CPU cost) is left to `EncodedRow.write_tiles`, which needs only the tile
    counts computed here, so that a batch can size one pixel buffer and have every row write into it.
    """
    # imported on use, to keep transformers, PIL, tokenizers out of light paths
    from r1v.data.prompt import encode_prompt, encode_sft
    from r1v.model.tiling import load_image, tile_count

    tok = load_tokenizer(model_dir)
    tile, per_tile = vision_geometry(model_dir)
    messages = [dict(m) for m in row["messages"] or []]
    if not messages:
        raise RowError("no_messages", "the row has no messages")
    try:
        images = [load_image(data) for data in row["images"] or []]
    except ValueError as e:
        raise RowError("image_decode", str(e)) from e
    counts = [tile_count(im.width, im.height, tile, 1, pre.max_tiles, pre.use_thumbnail) for im in images]
    # Tokenise with one context token per image, then expand (same ids, see _context_run_splits).
    compress = bool(counts) and _context_run_splits(model_dir)
    tiles_arg, per_tile_arg = ([1] * len(counts), 1) if compress else (counts, per_tile)
    runs = [n * per_tile for n in counts]
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    try:
        if with_labels:
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                raise RowError("empty_assistant", "the last turn must be a non-empty assistant turn")
            limit = 2**62 if compress else pre.max_length  # checked below on the expanded ids
            enc = encode_sft(messages, tok, tiles_arg, per_tile_arg, limit, system=pre.system_prompt)
            ids, labels = enc["input_ids"], enc["labels"]
            if compress:
                ids, labels = _expand_context(ids, labels, runs, ctx)
                if len(ids) > pre.max_length:  # the message encode_sft gives
                    raise ValueError(f"sample has {len(ids)} tokens, more than max_length {pre.max_length}")
        else:
            prompt_msgs = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            ids = encode_prompt(prompt_msgs, tok, tiles_arg, per_tile_arg, system=pre.system_prompt)
            if compress:
                ids, _ = _expand_context(ids, [], runs[: len(counts)], ctx)
            labels = []
            if len(ids) > pre.max_length:
                raise RowError("too_long", f"prompt has {len(ids)} tokens, max_length is {pre.max_length}")
    except RowError:
        raise
    except ValueError as e:
        reason = "too_long" if "max_length" in str(e) or "exceeds" in str(e) else "image_markers"
        raise RowError(reason, str(e)) from e
    return EncodedRow(ids, labels, images, counts, tile, pre)


def preprocess_row(row: dict[str, Any], model_dir: str, pre: PreprocessConfig, with_labels: bool = True
                   ) -> dict[str, Any]:
    """One row's model inputs: input_ids, labels, uint8 tile bytes, n_tiles. Raises RowError on bad input."""
    enc = encode_row(row, model_dir, pre, with_labels)
    return {"input_ids": enc.input_ids, "labels": enc.labels, "n_tiles": enc.n_tiles,
            "pixel_values": enc.pixel_bytes()}


def preprocess_batch(batch: pa.Table, model_dir: str, pre: dict[str, Any], with_labels: bool = True) -> pa.Table:
    """Preprocess a batch of corpus rows (run inside the read tasks, see `preprocessed_dataset`): never raises
    for a bad row, marks it with `error` instead.

    Two passes: decode + tokenise every row (which fixes each row's tile count), then tile them all into one
    uint8 buffer that becomes the `pixel_values` column as is. Building the column from per-row bytes would
    copy every tile twice more (2.4 MB per MATH-Vision row on average at 448 px, max 6 tiles).
    """
    cfg = PreprocessConfig.model_validate(pre)
    tile, _ = vision_geometry(model_dir)
    recs: list[dict[str, Any]] = []
    encoded: list[EncodedRow | None] = []
    for row in batch.to_pylist():
        rec = {"id": row["id"], "answer": row.get("answer") or "", "source": row.get("source") or "",
               "error": "", "detail": "", "input_ids": [], "labels": [], "n_tiles": 0, "row": row.get("row", -1)}
        enc = None
        try:
            enc = encode_row(row, model_dir, cfg, with_labels)
            rec.update(input_ids=enc.input_ids, labels=enc.labels, n_tiles=enc.n_tiles)
        except RowError as e:
            rec.update(error=e.reason, detail=e.detail[:500])
        recs.append(rec)
        encoded.append(enc)
    tile_bytes = 3 * tile * tile
    total = sum(r["n_tiles"] for r in recs)
    if total * tile_bytes >= 2**31:
        raise ValueError(f"a batch of {len(recs)} rows holds {total} tiles, over the 2 GiB of one Arrow binary "
                         f"column: use a smaller batch size")
    pixels = np.empty((total, 3, tile, tile), dtype=np.uint8)
    offsets = np.zeros(len(recs) + 1, dtype=np.int32)
    at = 0
    for i, enc in enumerate(encoded):
        if enc is not None:
            enc.write_tiles(pixels[at : at + enc.n_tiles])
            at += enc.n_tiles
        offsets[i + 1] = at * tile_bytes
    column = pa.Array.from_buffers(pa.binary(), len(recs), [None, pa.py_buffer(offsets), pa.py_buffer(pixels)])
    table = pa.Table.from_pylist(recs, schema=PREPROCESSED_SCHEMA.remove(PREPROCESSED_SCHEMA.get_field_index(
        "pixel_values")))
    return table.add_column(PREPROCESSED_SCHEMA.get_field_index("pixel_values"), "pixel_values", column)


BATCH_ROWS = 8  # rows per preprocessing call: the decoded images of a batch are held until it is tiled
# Rows per Ray task. Each task start (scheduling, the read task's set-up, the idle gap between one task's end and
# the next one's start) cost ~24 ms, measured from the gaps between a Ray worker's batches: 0.7 ms a row at 32
# rows a task, 0.2 at 128. A task holds one batch at a time, so memory does not grow with it; it only coarsens
# how work spreads over workers (a corpus of fewer rows than 128 per free CPU is read by fewer tasks).
ROWS_PER_TASK = 128
BLOCK_BYTES = 16 << 20  # Ray Data block size target of the preprocessed dataset (its own context only)


def epoch_order(corpus: str, seed: int | Sequence[int] | None = None) -> np.ndarray:
    """Global row indices in the order `preprocessed_dataset(corpus, seed=seed)` reads them: from the Parquet
    metadata alone, the same on every rank."""
    # imported on use, to keep ray out of light paths
    from r1v.data.reader import RowGroupSource

    return RowGroupSource(corpus, rows_per_task=ROWS_PER_TASK, seed=seed).order()


def balanced_shard(rows: np.ndarray, world: int, rank: int) -> np.ndarray:
    """Rank `rank`'s share of `rows`: a contiguous run of len(rows) // world rows, one more for the first
    len(rows) % world ranks. Contiguous, so that a rank reads few row groups beyond its own rows."""
    base, extra = divmod(len(rows), world)
    start = rank * base + min(rank, extra)
    return rows[start : start + base + (rank < extra)]


def preprocessed_dataset(corpus: str, model_dir: str, pre: PreprocessConfig, with_labels: bool = True,
                         concurrency: int | None = None, seed: int | Sequence[int] | None = None,
                         rows: np.ndarray | None = None):
    """A lazy Ray Dataset of preprocessed rows (order preserved), in corpus order, or with `seed` in that seed's
    permutation of row groups (`r1v.data.reader.RowGroupSource`); with `rows` (global indices), only those rows,
    dropped before they are decoded. Every row carries its global index (`row`).

    Each Ray task reads a few row groups of the corpus and preprocesses them `BATCH_ROWS` at a time
    (`r1v.data.reader`), so every free CPU preprocesses, even for a corpus in one file; `concurrency` caps
    the number of tasks at once (default: as many as there are free CPUs).
    """
    # imported on use, to keep ray, pandas, tqdm out of light paths
    import ray.data

    from r1v.data.reader import read_corpus

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    transform = functools.partial(preprocess_batch, model_dir=model_dir, pre=pre.model_dump(),
                                  with_labels=with_labels)
    ds = read_corpus(corpus, columns=["id", "images", "messages", "answer", "source"], rows_per_task=ROWS_PER_TASK,
                     batch_rows=BATCH_ROWS, transform=transform, concurrency=concurrency, seed=seed,
                     row_index=True, keep=rows)
    # Small blocks: a task then hands each preprocessed batch on as soon as it is made, instead of holding its
    # batches until a 128 MB block is full (about 50 MATH-Vision rows at 448 px). Holding them costs memory and
    # made every batch's pixel buffer land in fresh pages: 17.2-19.2 vs 16.6 ms a row (bench/data_pipeline.py).
    ds.context.target_max_block_size = BLOCK_BYTES
    return ds


def prepare_prompts(rows: list[dict[str, Any]], model_dir: str, pre: PreprocessConfig
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Corpus rows -> generation prompts (each row plus its input_ids and tiles), and quarantine records for
    the rows that fail; the GRPO prompt set and the eval stage read corpora this way."""
    good, bad = [], []
    for row in rows:
        try:
            good.append({**row, **preprocess_row(row, model_dir, pre, with_labels=False)})
        except RowError as e:
            bad.append({"id": row["id"], "reason": e.reason, "detail": e.detail, "source": row.get("source") or ""})
    return good, bad
