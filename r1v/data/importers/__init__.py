"""Importers: external multimodal corpora -> the r1v corpus schema, with a quarantine for bad rows.

Each format module exposes `records(cfg) -> Iterator[Record]`; `driver.import_corpus` validates and writes.
Modules are imported lazily so that `import r1v.data.importers` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig
    from r1v.data.validate import Record

FORMAT_MODULES = {
    "llava": "r1v.data.importers.llava",
    "openai": "r1v.data.importers.openai",
    "webdataset": "r1v.data.importers.webdataset",
    "parquet": "r1v.data.importers.parquet",
    "jsonl_folder": "r1v.data.importers.jsonl_folder",
}


def open_records(cfg: DataImportConfig) -> Iterator[Record]:
    """The source rows of `cfg.source`, parsed by the `cfg.format` reader, lazily."""
    if cfg.format not in FORMAT_MODULES:
        raise ValueError(f"unknown import format {cfg.format!r}; known: {', '.join(FORMAT_MODULES)}")
    return importlib.import_module(FORMAT_MODULES[cfg.format]).records(cfg)
