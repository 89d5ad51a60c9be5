"""A folder of JSONL plus images (MATH-Vision's layout): `{"id", "question", "options", "answer",
"image": "images/4.jpg"}` per line, image paths relative to the folder.

Each item becomes one user turn laid out like the evaluation prompt (one `<image>` per image in front, the
benchmark's own `<image1>` placeholders kept as text, lettered options) with `answer` as ground truth: a
prompt row for RL or evaluation. Lines with `conversations`/`messages` are read as conversations instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from r1v.data.importers.common import expand_sources, iter_jsonl, record_from_obj, resolver_for
from r1v.data.validate import Record

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig


def records(cfg: DataImportConfig) -> Iterator[Record]:
    for path in expand_sources(cfg.source, (".jsonl",)):
        resolve = resolver_for(cfg, path)
        for i, (loc, obj) in enumerate(iter_jsonl(path)):
            yield record_from_obj(obj, loc, f"{path.stem}-{i}", resolve)
