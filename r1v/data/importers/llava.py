"""LLaVA-style JSON: `[{"id", "image": path | [paths], "conversations": [{"from", "value"}]}]` (or JSONL).

Image paths are relative to `image_root` (default: the JSON file's folder). The array is read element by
element, so a multi-gigabyte `llava_v1_5_mix665k.json` never sits in memory.
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
    for path in expand_sources(cfg.source, (".json", ".jsonl")):
        resolve = path_resolver(Path(cfg.image_root) if cfg.image_root else path.parent)
        reader = iter_json_array(path) if path.suffix.lower() == ".json" else iter_jsonl(path)
        for i, (loc, obj) in enumerate(reader):
            yield record_from_obj(obj, loc, f"{path.stem}-{i}", resolve)
