"""Fixture builders shared by the importer tests (images of every awkward kind, a tiny model), and the
streaming JSON reader's own tests."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r1v.data.importers.common import iter_json_array


def png(w: int = 40, h: int = 30, mode: str = "RGB", color=(200, 30, 30), seed: int | None = None) -> bytes:
    """PNG bytes; `seed` fills with noise so the file does not compress (truncation then bites)."""
    if seed is not None:
        arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
    else:
        img = Image.new(mode, (w, h), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(w: int = 40, h: int = 30, mode: str = "RGB", color=(30, 200, 30),
         exif_orientation: int | None = None, seed: int | None = None) -> bytes:
    if seed is not None:
        img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    else:
        img = Image.new(mode, (w, h), color)
    buf = io.BytesIO()
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def odd_mode_images() -> dict[str, bytes]:
    """One image per mode/format that must be converted (and still import as a good row)."""
    out = {"cmyk.jpg": jpeg(mode="CMYK", color=(0, 128, 128, 0)),
           "exif6.jpg": jpeg(40, 30, exif_orientation=6),
           "la.png": png(mode="LA", color=(128, 200)),
           "rgba.png": png(mode="RGBA", color=(10, 20, 30, 0))}
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    out["palette.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(buf, format="PNG")
    out["gray16.png"] = buf.getvalue()
    return out


def huge_header_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's signature), with a valid CRC."""
    data = bytearray(png(8, 8))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


BROKEN_REASON = {"decode": "image_decode", "empty": "image_empty", "large": "image_too_large"}


def broken_images() -> dict[str, bytes]:
    """name -> (bytes) for images that must be quarantined, grouped by expected reason in the name."""
    noise_png, noise_jpg = png(64, 64, seed=1), jpeg(64, 64, seed=2)
    return {"decode-garbage.jpg": bytes(random.Random(0).randbytes(500)),
            "decode-text.png": b"this is not an image at all\n",
            "decode-trunc.png": noise_png[: len(noise_png) // 2],
            "decode-trunc.jpg": noise_jpg[: len(noise_jpg) // 2],
            "empty-a.jpg": b"", "empty-b.png": b"",
            "large-bomb.png": huge_header_png(60_000, 60_000),
            "large-64mp.png": huge_header_png(8_000, 8_000)}


_TINY: dict[str, str] = {}


def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny VLM (56 px tiles, 4 tokens per tile) for tokenised length checks, built once."""
    if "dir" not in _TINY:
        from r1v.model.io import save_model
        from r1v.model.tiny import TinySpec, build_tiny_vlm

        m, tok = build_tiny_vlm(TinySpec())
        _TINY["dir"] = str(save_model(m, tok, tmp_path_factory.mktemp("tiny") / "vlm"))
    return _TINY["dir"]


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the streaming JSON array reader


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_json_array_any_chunking(tmp_path, chunk) -> None:
    rows = [{"id": i, "text": "x" * (i * 13), "nested": {"a": [1, 2, {"b": "]},[{"}]}, "flag": i % 2 == 0,
             "none": None, "num": 12345.5 * i, "esc": "\u00e9 \\u \"q\""} for i in range(30)]
    rows.append(42)  # a non-object element still comes out (the importer quarantines it)
    p = write_json(tmp_path / "a.json", rows)
    got = list(iter_json_array(p, chunk=chunk))
    assert [o for _, o in got] == rows
    assert got[3][0] == f"{p}:#3"


def test_json_array_empty_and_jsonl_fallback(tmp_path) -> None:
    assert list(iter_json_array(write_json(tmp_path / "e.json", []))) == []
    p = tmp_path / "l.json"
    p.write_text('{"a": 1}\n\n{"a": 2}\nnot json\n')
    got = list(iter_json_array(p))
    assert [o for _, o in got][:2] == [{"a": 1}, {"a": 2}]
    assert got[1][0] == f"{p}:3" and got[2][1].reason == "bad_record"


@pytest.mark.parametrize("text,match", [('[{"a": 1}, {"a": }]', "element 1"),
                                        ('[{"a": 1} {"a": 2}]', "expected ','"),
                                        ('[{"a": 1},', "ends inside"), ('"str"', "expected a JSON array")])
def test_json_array_syntax_errors_fail_loudly(tmp_path, text, match) -> None:
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        list(iter_json_array(p, chunk=4))
