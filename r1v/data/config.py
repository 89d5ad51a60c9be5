"""Configs of the data stage kinds: `data.synthetic` and `data.import` (also `r1v data import`).

Import: which format, where, and how strict.

Length checks reuse `PreprocessConfig` so that "fits the context" means exactly what the SFT stage will
build (same max_length, tiling, thumbnail and system prompt).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from r1v.core.config import PreprocessConfig, Strict, operational


class SyntheticDataConfig(Strict):
    """A visual arithmetic task: numbers drawn in an image, the answer needs reading them and one operation."""

    n_train: int = Field(64, ge=1)
    n_test: int = Field(16, ge=1)
    seed: int = 0
    width: int = Field(112, ge=16)
    height: int = Field(56, ge=16)
    max_value: int = Field(9, ge=1)
    ops: list[Literal["sum", "difference", "product", "max"]] = ["sum", "difference", "product"]
    corrupt_rows: int = Field(0, ge=0, description="rows with undecodable images, to exercise the quarantine")


FORMATS = ("llava", "openai", "webdataset", "parquet", "jsonl_folder")
Format = Literal["llava", "openai", "webdataset", "parquet", "jsonl_folder"]


class DataImportConfig(Strict):
    """Import an external multimodal corpus into the r1v schema, quarantining bad rows with a reason."""

    format: Format = Field(description="llava | openai (ShareGPT/OpenAI messages) | webdataset | parquet "
                                       "| jsonl_folder (a folder of JSONL plus images, like MATH-Vision)")
    source: str = Field(description="a file, a directory (all files of the format in it) or a glob")
    image_root: str | None = Field(None, description="root of relative image paths (default: the "
                                                     "file's folder)")
    allow_outside_root: bool = Field(False, description="read image paths that resolve outside the image root "
                                                        "(`..`, absolute paths, symlinks); by default such "
                                                        "rows are quarantined as outside_root")
    source_name: str | None = Field(None, description="value of the corpus `source` column; default the "
                                                      "source's file or folder name")
    model: str | None = Field(None, description="model dir whose tokenizer and vision geometry the length "
                                                "check uses; None skips the length check")
    preprocess: PreprocessConfig = PreprocessConfig()
    on_too_long: Literal["drop", "truncate"] = Field(
        "drop", description="drop: quarantine as too_long; truncate: drop trailing turns until it fits")
    max_pixels: int = Field(50_000_000, ge=1, description="decompression-bomb guard, checked from the header "
                                                          "(Pillow's own limit, 179M, still applies)")
    max_image_bytes: int = Field(64 << 20, ge=1, description="larger image files are quarantined unread")
    rows_per_file: int = Field(10_000, ge=1, description="rows per corpus part file")
    buffer_bytes: int = Field(32 << 20, ge=1 << 16, description="row-group flush threshold; peak memory is "
                                                                "about libraries + 5 x this")
    batch_rows: int = operational(64, ge=1, description="rows per Parquet read batch and per worker task")
    workers: int = operational(1, ge=1, description="validation processes (image decoding is the CPU cost)")
    row_timeout_s: float = Field(60.0, gt=0, description="a row whose validation (image reads, decoding, "
                                                         "tokenising) takes longer is quarantined as timeout "
                                                         "and its worker process replaced")
    limit: int | None = Field(None, ge=1, description="import only the first N rows (a trial run)")
