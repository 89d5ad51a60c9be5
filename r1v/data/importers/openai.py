"""OpenAI / ShareGPT messages JSONL: one `{"messages": [{"role", "content"}], "images"?: [...]}` per line.

`content` is text with `<image>` markers plus a top-level `images` list (LLaMA-Factory's ShareGPT layout),
or a list of parts (`{"type": "text"}`, `{"type": "image_url", "image_url": {"url": path | data URL}}`) whose
image parts become markers in place. Data URLs are decoded; http(s) URLs are quarantined (no downloads).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from r1v.data.importers.common import json_records
from r1v.data.validate import Record

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig


def records(cfg: DataImportConfig) -> Iterator[Record]:
    return json_records(cfg, (".jsonl", ".json"))
