"""Parquet with image columns stored as `{bytes, path}` structs (the Hugging Face `Image` feature layout of
MMMU, MathVista, LLaVA-OneVision-Data, ...), a list of them, or plain binary `image*` columns.

Image columns are found by type and taken in schema order (`image_1` .. `image_7`); every other column is
text: `conversations`/`messages`, or `question` (+ `options`, `answer`), the rest goes to `meta`. A struct
with null bytes but a path is read from `image_root`. Files are read `batch_rows` rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from r1v.data.importers.common import expand_sources, record_from_obj, resolver_for
from r1v.data.pipeline import RowError
from r1v.data.validate import BAD_RECORD, ImageRef, Record

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def image_columns(schema: pa.Schema) -> list[str]:
    """Columns holding images: `{bytes, path}` structs, lists of them, or binary columns named image*."""
    out = []
    for f in schema:
        t = f.type
        if _is_image_struct(t) or (pa.types.is_list(t) and _is_image_struct(t.value_type)):
            out.append(f.name)
        elif (pa.types.is_binary(t) or pa.types.is_large_binary(t)) and "image" in f.name.lower():
            out.append(f.name)
    return out


def _images(row: dict[str, Any], cols: list[str], resolve) -> list[ImageRef]:
    """A row's images in column order; a null column is "no image" (MMMU's unused image_5..7)."""
    refs: list[ImageRef] = []
    for c in cols:
        v = row.pop(c)
        for item in v if isinstance(v, list) else [v]:
            if item is None or (isinstance(item, dict) and not item.get("bytes") and not item.get("path")):
                continue
            refs.append(resolve(item))
    return refs


def records(cfg: DataImportConfig) -> Iterator[Record]:
    for path in expand_sources(cfg.source, (".parquet",), recursive=True):
        resolve = resolver_for(cfg, path)
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            err = RowError(BAD_RECORD, f"unreadable Parquet file: {e}")
            yield Record.failed(path.name, str(path), err)
            continue
        cols = image_columns(pf.schema_arrow)
        index = 0
        for batch in pf.iter_batches(batch_size=cfg.batch_rows):
            for row in batch.to_pylist():
                loc, rid = f"{path}:{index}", f"{path.stem}-{index}"
                index += 1
                try:
                    images = _images(row, cols, resolve)
                except RowError as e:
                    yield Record.failed(str(row.get("id") or rid), loc, e)
                    continue
                yield record_from_obj(row, loc, rid, resolve, images=images)
