"""WebDataset tar shards: consecutive members sharing a key form a sample (`k.json` + `k.jpg`, or several
images as `k.0.png`, `k.1.png`, ...).

The `.json` member holds `conversations`/`messages` (or `question`/`answer`); the sample's image members are
its images, in the order of their extensions. Shards are streamed (`r|*`), one sample in memory at a time.
A shard that breaks mid-way yields one bad_record for its unreadable rest, so the loss is counted.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from r1v.data.importers.common import expand_sources, record_from_obj, resolver_for
from r1v.data.pipeline import RowError
from r1v.data.validate import BAD_RECORD, Record

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _natural(ext: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", ext)]


def _sample(shard: Path, key: str, members: dict[str, bytes], resolve) -> Record:
    loc = f"{shard}:{key}"
    raw = members.get("json")
    if raw is None:
        err = RowError(BAD_RECORD, f"no .json member (has {sorted(members)})")
        return Record.failed(key, loc, err)
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return Record.failed(key, loc, RowError(BAD_RECORD, f"invalid JSON: {e}"))
    exts = sorted((e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS), key=_natural)
    if isinstance(obj, dict) and "id" not in obj:
        obj["id"] = key
    return record_from_obj(obj, loc, key, resolve, images=[members[e] for e in exts])


def _shard(path: Path, resolve) -> Iterator[Record]:
    key, members, last = None, {}, "start of shard"
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split(m.name)
                if key is not None and k != key:
                    yield _sample(path, key, members, resolve)
                    members = {}
                key, last = k, m.name
                f = tf.extractfile(m)
                members[ext] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        err = RowError(BAD_RECORD, f"shard unreadable from member {last} on: {e}")
        yield Record.failed(f"{path.name}@{last}", f"{path}:{last}", err)
        return
    if key is not None:
        yield _sample(path, key, members, resolve)


def records(cfg: DataImportConfig) -> Iterator[Record]:
    for path in expand_sources(cfg.source, (".tar", ".tar.gz", ".tgz"), recursive=True):
        yield from _shard(path, resolver_for(cfg, path))
