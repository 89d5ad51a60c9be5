"""Row validation for importers: every row is checked once, at import, so training never meets a broken one.

Why at import: a bad image or a marker mismatch found mid-epoch costs a worker restart or a silently skipped
row; found here it costs one quarantine record with a reason code and the row's source location. Images are
normalised to what `r1v.model.tiling.load_image` reads the same everywhere (RGB or L, EXIF orientation
applied, JPEG/PNG/WebP); bytes are re-encoded only when such a conversion was needed.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from r1v.data.pipeline import RowError, load_tokenizer, vision_geometry
from r1v.data.schema import make_row
from r1v.model.tiling import choose_grid
from r1v.model.tokens import IMAGE_MARKER, IMG_CONTEXT, IMG_END, IMG_START

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig

IMAGE_MISSING = "image_missing"      # path does not exist, null image, remote URL
IMAGE_EMPTY = "image_empty"          # zero bytes
IMAGE_DECODE = "image_decode"        # not an image, truncated, corrupt
IMAGE_TOO_LARGE = "image_too_large"  # pixel count over max_pixels (decompression bomb guard) or file too big
IMAGE_MARKERS = "image_markers"      # number of <image> markers != number of images
ROLES = "roles"                      # unknown role, roles not alternating, unanswered last user turn
EMPTY_TURN = "empty_turn"            # a turn with no text, or nothing to learn from (no reply, no answer)
TOO_LONG = "too_long"                # tokenised length over max_length (drop, or truncating not enough)
BAD_RECORD = "bad_record"            # unparsable line/record, missing fields, wrong types
OUTSIDE_ROOT = "outside_root"        # image path resolves (`..`, absolute, symlink) outside the image root
NOT_A_FILE = "not_a_file"            # image path is a FIFO, directory, device, socket: only regular files are read
TIMEOUT = "timeout"                  # validating the row took over row_timeout_s (a stuck read, a slow decode)
VALIDATOR_CRASHED = "validator_crashed"  # the validator process died on the row (a native crash, OOM kill)
REASONS = (IMAGE_MISSING, IMAGE_EMPTY, IMAGE_DECODE, IMAGE_TOO_LARGE, IMAGE_MARKERS, ROLES, EMPTY_TURN,
           TOO_LONG, BAD_RECORD, OUTSIDE_ROOT, NOT_A_FILE, TIMEOUT, VALIDATOR_CRASHED)

KEEP_MODES = frozenset({"RGB", "L"})
KEEP_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


@dataclass(frozen=True)
class LocalImage:
    """A local image file, read at validation; with a `root` it must resolve (symlinks followed) inside it."""

    path: Path
    root: Path | None = None


ImageRef = bytes | LocalImage | Path | None
"""An image as an importer found it: bytes, a local file read at validation (a bare Path is unconfined), or
None (a null image)."""


@dataclass
class Record:
    """One source row as parsed by an importer, before validation; `error` is set when parsing failed."""

    id: str
    location: str
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    answer: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (reason, detail): a tuple, since RowError does not pickle

    @classmethod
    def failed(cls, id: str, location: str, err: RowError) -> Record:
        return cls(id=id, location=location, error=(err.reason, err.detail))


@dataclass
class Outcome:
    """A validated row (`row` set) or a quarantine verdict (`reason`, `detail`)."""

    row: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""
    truncated_turns: int = 0
    images_converted: int = 0


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: 16/32-bit and float scaled to 8 bits, transparency composited on white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def normalize_image(data: bytes, max_pixels: int) -> tuple[bytes, tuple[int, int], bool]:
    """(bytes to store, (width, height) after orientation, converted?) or RowError.

    The pixel limit is checked from the header, before any decoding, so a small file declaring a huge canvas
    (a decompression bomb) costs nothing.
    """
    if not data:
        raise RowError(IMAGE_EMPTY, "image has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise RowError(IMAGE_TOO_LARGE, f"{w}x{h} = {w * h} pixels, max_pixels is {max_pixels}")
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        if img.mode in KEEP_MODES and img.format in KEEP_FORMATS and orientation in (1, None):
            return data, (w, h), False
        out = _to_rgb(ImageOps.exif_transpose(img))
        buf = io.BytesIO()
        if img.format in ("JPEG", "MPO"):
            out.save(buf, format="JPEG", quality=95)
        else:
            out.save(buf, format="PNG")
        return buf.getvalue(), out.size, True
    except RowError:
        raise
    except Image.DecompressionBombError as e:
        raise RowError(IMAGE_TOO_LARGE, str(e)) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for bad data
        raise RowError(IMAGE_DECODE, f"cannot decode image ({len(data)} bytes): {e}") from e


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_file(ref: LocalImage, max_bytes: int) -> bytes:
    """A local image's bytes, read only when it is a regular file inside its root, and never more than
    `max_bytes` + 1 bytes of it (enough to tell it is too big).

    The path is resolved first (so `..` and symlinks are judged by where they lead), stat'ed before it is
    opened (a FIFO or a device is never opened: opening a FIFO blocks until a writer comes), opened
    non-blocking and without following a last-moment symlink, and checked again on the open descriptor.
    """
    path = os.path.realpath(ref.path)
    if ref.root is not None and not _inside(path, os.path.realpath(ref.root)):
        raise RowError(OUTSIDE_ROOT, f"{ref.path} resolves to {path}, outside the image root {ref.root} "
                                     f"(allow_outside_root is false)")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise RowError(NOT_A_FILE, f"{ref.path} is not a regular file (mode {stat.filemode(st.st_mode)})")
        if st.st_size > max_bytes:
            raise RowError(IMAGE_TOO_LARGE, f"{ref.path}: {st.st_size} bytes, max_image_bytes is {max_bytes}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RowError(IMAGE_MISSING, f"{ref.path}: {e.strerror or e}") from e
    try:
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise RowError(NOT_A_FILE, f"{ref.path} changed while being opened")
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise RowError(IMAGE_MISSING, f"{ref.path}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def read_image(ref: ImageRef, max_bytes: int) -> bytes:
    """Bytes of an image reference; a missing, misplaced or oversized file is a row problem, not an import
    failure."""
    if ref is None:
        raise RowError(IMAGE_MISSING, "image is null")
    if isinstance(ref, bytes | bytearray):
        data = bytes(ref)
    else:
        data = read_file(ref if isinstance(ref, LocalImage) else LocalImage(Path(ref)), max_bytes)
    if len(data) > max_bytes:
        raise RowError(IMAGE_TOO_LARGE, f"image has {len(data)} bytes or more, max_image_bytes is {max_bytes}")
    return data


def check_messages(messages: list[dict[str, str]], n_images: int, answer: str) -> None:
    """Roles, empty turns and marker count; raises RowError with the first problem found."""
    if not messages:
        raise RowError(BAD_RECORD, "the record has no turns")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise RowError(ROLES, f"turn {i} has unknown role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise RowError(BAD_RECORD, f"turn {i} content is {type(m.get('content')).__name__}, not text")
        for tok in (IMG_CONTEXT, IMG_START, IMG_END):
            if tok in m["content"]:
                raise RowError(IMAGE_MARKERS, f"turn {i} contains {tok}: only {IMAGE_MARKER} marks images")
    offset = 1 if messages[0]["role"] == "system" else 0
    body = messages[offset:]
    if not body:
        raise RowError(ROLES, "only a system turn")
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RowError(ROLES, f"turn {j + offset} is {m['role']}, expected {want} (roles alternate)")
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            raise RowError(EMPTY_TURN, f"{m['role']} turn {i} is empty")
    if body[-1]["role"] == "user":
        if len(body) > 1:
            raise RowError(ROLES, "the conversation ends with an unanswered user turn")
        if not answer.strip():
            raise RowError(EMPTY_TURN, "no assistant turn and no answer: nothing to learn from")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers != n_images:
        raise RowError(IMAGE_MARKERS, f"{markers} {IMAGE_MARKER} marker(s) but {n_images} image(s)")


class Validator:
    """Checks and normalises records per a DataImportConfig; the length check needs `cfg.model`."""

    def __init__(self, cfg: DataImportConfig) -> None:
        self.cfg = cfg
        self.tok = None
        if cfg.model:
            self.tok = load_tokenizer(str(cfg.model))
            self.tile_size, self.per_tile = vision_geometry(str(cfg.model))

    def n_tiles(self, size: tuple[int, int]) -> int:
        """Tiles `dynamic_tiles` will cut (thumbnail included), from the size alone."""
        cols, rows = choose_grid(size[0], size[1], self.tile_size, 1, self.cfg.preprocess.max_tiles)
        return cols * rows + (1 if self.cfg.preprocess.use_thumbnail and cols * rows != 1 else 0)

    def length(self, messages: list[dict[str, str]], sizes: list[tuple[int, int]]) -> int:
        """Token count exactly as SFT (or, for prompt rows, generation) will build the sample."""
        # imported on use, to keep transformers, tokenizers, tqdm out of light paths
        from r1v.data.prompt import encode_prompt, encode_sft

        tiles = [self.n_tiles(s) for s in sizes]
        system = self.cfg.preprocess.system_prompt
        if any(m["role"] == "assistant" for m in messages):
            return len(encode_sft(messages, self.tok, tiles, self.per_tile, 1 << 62, system)["input_ids"])
        return len(encode_prompt(messages, self.tok, tiles, self.per_tile, system))

    def fit(self, messages: list[dict[str, str]], sizes: list[tuple[int, int]]) -> int:
        """Number of leading turns to keep so the row fits max_length (truncate drops whole trailing turns,
        keeping a conversation that ends on an assistant reply); raises RowError(TOO_LONG) when none fits."""
        limit = self.cfg.preprocess.max_length
        try:
            n = self.length(messages, sizes)
            if n <= limit:
                return len(messages)
            if self.cfg.on_too_long == "truncate":
                for k in range(len(messages) - 2, 0, -1):
                    if messages[k]["role"] != "assistant":
                        continue
                    keep = sum(m["content"].count(IMAGE_MARKER) for m in messages[: k + 1])
                    if self.length(messages[: k + 1], sizes[:keep]) <= limit:
                        return k + 1
        except ValueError as e:  # the chat template cannot place labels, etc.
            raise RowError(BAD_RECORD, str(e)) from e
        raise RowError(TOO_LONG, f"{n} tokens, max_length is {limit} (on_too_long={self.cfg.on_too_long})")

    def __call__(self, rec: Record, source: str) -> Outcome:
        try:
            if rec.error is not None:
                raise RowError(*rec.error)
            check_messages(rec.messages, len(rec.images), rec.answer)
            images, sizes, converted = [], [], 0
            for i, ref in enumerate(rec.images):
                try:
                    data, size, conv = normalize_image(read_image(ref, self.cfg.max_image_bytes),
                                                       self.cfg.max_pixels)
                except RowError as e:
                    raise RowError(e.reason, f"image {i}: {e.detail}") from e
                images.append(data)
                sizes.append(size)
                converted += conv
            messages, meta = rec.messages, dict(rec.meta, origin=rec.location)
            if self.tok is not None:
                keep = self.fit(messages, sizes)
                if keep < len(messages):
                    n_img = sum(m["content"].count(IMAGE_MARKER) for m in messages[:keep])
                    meta["truncated_turns"] = len(messages) - keep
                    messages, images = messages[:keep], images[:n_img]
        except RowError as e:
            return Outcome(reason=e.reason, detail=e.detail[:1000])

        row = make_row(rec.id, messages, images, answer=rec.answer, source=source, meta=meta)
        return Outcome(row=row, truncated_turns=meta.get("truncated_turns", 0), images_converted=converted)
