"""OpenAI / ShareGPT messages JSONL: one `{"messages": [{"role", "content"}], "images"?: [...]}` per line.

`content` is text with `<image>` markers plus a top-level `images` list (LLaMA-Factory's ShareGPT layout),
or a list of parts (`{"type": "text"}`, `{"type": "image_url", "image_url": {"url": path | data URL}}`) whose
image parts become markers in place. Data URLs are decoded; http(s) URLs are quarantined (no downloads).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from r1v.data.importers.common import (
    expand_sources,
    iter_json_array,
    iter_jsonl,
    path_resolver,
    record_from_obj,
)
from r1v.data.validate import Record

if TYPE_CHECKING:
    from r1v.data.import_config import DataImportConfig


def records(cfg: DataImportConfig) -> Iterator[Record]:
    for path in expand_sources(cfg.source, (".jsonl", ".json")):
        resolve = path_resolver(Path(cfg.image_root) if cfg.image_root else path.parent)
        reader = iter_json_array(path) if path.suffix.lower() == ".json" else iter_jsonl(path)
        for i, (loc, obj) in enumerate(reader):
            yield record_from_obj(obj, loc, f"{path.stem}-{i}", resolve)
