"""LLaVA-style JSON: `[{"id", "image": path | [paths], "conversations": [{"from", "value"}]}]` (or JSONL).

Image paths are relative to `image_root` (default: the JSON file's folder). The array is read element by
element, so a multi-gigabyte `llava_v1_5_mix665k.json` never sits in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from r1v.data.importers.common import json_records
from r1v.data.validate import Record

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig


def records(cfg: DataImportConfig) -> Iterator[Record]:
    return json_records(cfg, (".json", ".jsonl"))
