"""Parsing shared by the importers: source expansion, streaming JSON readers, record normalisation.

Every reader yields one `Record` per source row and never raises for a bad row (a generator that raises
stops, and the rows after it would be lost silently): parse problems become `Record.error`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import glob
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1v.data.pipeline import RowError
from r1v.data.validate import BAD_RECORD, IMAGE_DECODE, IMAGE_MISSING, ROLES, ImageRef, LocalImage, Record
from r1v.model.tokens import IMAGE_MARKER

if TYPE_CHECKING:
    from r1v.data.config import DataImportConfig

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "model": "assistant", "chatgpt": "assistant", "system": "system"}
CONSUMED = {"id", "image", "images", "conversations", "messages", "question", "problem", "options", "choices",
            "answer"}
Resolve = Callable[[Any], ImageRef]


def expand_sources(source: str, suffixes: tuple[str, ...], recursive: bool = False) -> list[Path]:
    """A file, every matching file in a directory, or a glob; an empty match is an error, not 0 rows."""
    p = Path(source)
    if p.is_dir():
        it = p.rglob("*") if recursive else p.iterdir()
        files = sorted(f for f in it if f.is_file() and f.name.lower().endswith(suffixes))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(source, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files at {source}")
    return files


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any | RowError]]:
    """(location, object or RowError) per non-blank line, reading one line at a time."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"{path}:{lineno}", RowError(BAD_RECORD, f"invalid JSON: {e}")


def iter_json_array(path: Path, chunk: int = 1 << 20,
                    max_record: int = 256 << 20) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, decoded one at a time from a sliding buffer (no ijson needed).

    A file that starts with `{` is read as JSONL. A syntax error inside an array cannot be resynchronised
    (element boundaries are unknown), so it fails the import with the character offset.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, base, eof = f.read(chunk), 0, 0, False
        first = buf.lstrip()[:1]
        if first == "{":
            yield from iter_jsonl(path)
            return
        if first != "[":
            raise ValueError(f"{path}: expected a JSON array or JSON lines, found {first!r}")
        pos = buf.index("[") + 1
        index, need_comma = 0, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos >= len(buf):
                data = f.read(chunk)
                if not data:
                    raise ValueError(f"{path}: file ends inside the array (element {index})")
                buf, base, pos = buf[pos:] + data, base + pos, 0
                continue
            if buf[pos] == "]":
                return
            if need_comma:
                if buf[pos] != ",":
                    raise ValueError(f"{path}: expected ',' or ']' at character {base + pos}")
                pos, need_comma = pos + 1, False
                continue
            try:
                obj, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof
            except json.JSONDecodeError as e:
                # A cut at the buffer's end fails near the end, or as an unterminated string; anything else
                # is a real syntax error, reported now rather than after reading up to max_record.
                cut = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")
                if eof or not cut or len(buf) - pos > max_record:
                    raise ValueError(f"{path}: invalid JSON in element {index} near character "
                                     f"{base + e.pos}: {e.msg}") from None
                complete = False
            if not complete:
                data = f.read(chunk)
                eof = not data
                buf, base, pos = buf[pos:] + data, base + pos, 0
                continue
            yield f"{path}:#{index}", obj
            index, pos, need_comma = index + 1, end, True
            if pos > chunk:
                buf, base, pos = buf[pos:], base + pos, 0


def image_root(cfg: DataImportConfig, source_file: Path) -> Path:
    """The folder a source file's relative image paths are relative to: `cfg.image_root`, else the file's own
    folder. Local images must resolve inside it unless `cfg.allow_outside_root`."""
    return Path(cfg.image_root) if cfg.image_root else source_file.parent


def resolver_for(cfg: DataImportConfig, source_file: Path) -> Resolve:
    """`path_resolver` for the images of one source file, confined to its `image_root` per the config."""
    return path_resolver(image_root(cfg, source_file), confine=not cfg.allow_outside_root)


def path_resolver(root: Path, confine: bool = True) -> Resolve:
    """Image reference -> ImageRef: data URLs decoded, local paths relative to `root` (and, with `confine`,
    required at validation to resolve inside it), remote URLs refused."""

    def resolve(ref: Any) -> ImageRef:
        if ref is None:
            return None
        if isinstance(ref, bytes | bytearray):
            return bytes(ref)
        if isinstance(ref, dict):  # {"bytes", "path"} structs, {"url"} objects
            if ref.get("bytes"):
                return bytes(ref["bytes"])
            return resolve(ref.get("url") or ref.get("path") or ref.get("image"))
        if not isinstance(ref, str) or not ref:
            raise RowError(BAD_RECORD, f"image reference must be a path, data URL or bytes, got {ref!r:.80}")
        if ref.startswith("data:"):
            try:
                return base64.b64decode(ref.split(",", 1)[1], validate=True)
            except (IndexError, binascii.Error) as e:
                raise RowError(IMAGE_DECODE, f"bad data URL: {e}") from e
        if ref.startswith(("http://", "https://")):
            raise RowError(IMAGE_MISSING, f"remote image {ref[:200]} (download images before importing)")
        return LocalImage(root / ref.removeprefix("file://"), root if confine else None)

    return resolve


def _content_text(content: Any, images: list[ImageRef], resolve: Resolve) -> str:
    """Message content to text: OpenAI-style parts become text with an `<image>` marker per image part."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise RowError(BAD_RECORD, f"content must be text or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            out.append(str(part.get("text") or ""))
        elif kind in ("image_url", "image", "input_image"):
            ref = part.get("image_url") or part.get("image") or part.get("url") or part.get("path")
            images.append(resolve(ref))
            out.append(IMAGE_MARKER)
        else:
            raise RowError(BAD_RECORD, f"unknown content part {str(part)[:100]}")
    return "".join(out)


def parse_turns(turns: Any, images: list[ImageRef], resolve: Resolve) -> list[dict[str, str]]:
    """LLaVA `{from, value}` or OpenAI `{role, content}` turns -> r1v messages (part images appended)."""
    if not isinstance(turns, list):
        raise RowError(BAD_RECORD, f"turns must be a list, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(BAD_RECORD, f"turn {i} is {type(t).__name__}, not an object")
        role = t.get("from", t.get("role"))
        if str(role).lower() not in ROLE_MAP:
            raise RowError(ROLES, f"turn {i} has unknown role {role!r}")
        text = _content_text(t.get("value", t.get("content")), images, resolve)
        out.append({"role": ROLE_MAP[str(role).lower()], "content": text})
    return out


def question_messages(question: str, options: list[Any], n_images: int) -> list[dict[str, str]]:
    """A benchmark-style item as one user turn, laid out as `r1v.eval.prompts` does (markers in front,
    lettered options), so imported prompts match evaluation prompts; markers already in the text are kept."""
    body = question.strip()
    if options:
        body += "\nOptions:\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options[:26]))
    if IMAGE_MARKER in body or not n_images:
        return [{"role": "user", "content": body}]
    return [{"role": "user", "content": IMAGE_MARKER * n_images + "\n" + body}]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, bytes | bytearray):
        return f"<{len(v)} bytes>"
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _as_list(v: Any) -> list[Any]:
    if v is None or v == "":
        return []
    return list(v) if isinstance(v, list | tuple) else [v]


def _options(v: Any) -> list[Any]:
    """Options as a list; MMMU stores them as the text of a Python list."""
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError) as e:
            raise RowError(BAD_RECORD, f"options {v[:100]!r} is not a list: {e}") from e
    return [str(o) for o in _as_list(v)]


def record_from_obj(obj: Any, location: str, default_id: str, resolve: Resolve,
                    images: list[ImageRef] | None = None) -> Record:
    """Any supported JSON-ish row -> Record: `conversations`/`messages` rows, or `question` (+ `options`,
    `answer`) rows. `images` overrides the row's `image`/`images` (WebDataset members, Parquet columns)."""
    if isinstance(obj, RowError):
        return Record.failed(default_id, location, obj)
    rid = default_id
    try:
        if not isinstance(obj, dict):
            raise RowError(BAD_RECORD, f"a row must be a JSON object, got {type(obj).__name__}")
        rid = str(obj.get("id") if obj.get("id") not in (None, "") else default_id)
        refs = list(images) if images is not None else [resolve(r) for r in
                                                        _as_list(obj.get("images", obj.get("image")))]
        answer = "" if obj.get("answer") is None else str(obj["answer"])
        turns = obj.get("conversations", obj.get("messages"))
        question = obj.get("question", obj.get("problem"))
        if turns is not None:
            messages = parse_turns(turns, refs, resolve)
        elif isinstance(question, str):
            options = _options(obj.get("options", obj.get("choices")))
            messages = question_messages(question, options, len(refs))
        else:
            raise RowError(BAD_RECORD, "no conversations, messages or question field")
        meta = {k: _jsonable(v) for k, v in obj.items() if k not in CONSUMED}
        return Record(id=rid, location=location, messages=messages, images=refs, answer=answer, meta=meta)
    except RowError as e:
        return Record.failed(rid, location, e)


def json_records(cfg: DataImportConfig, suffixes: tuple[str, ...]) -> Iterator[Record]:
    """Records of JSON-array or JSONL files (LLaVA and OpenAI/ShareGPT share this; `record_from_obj` tells
    their row layouts apart), image paths resolved against `image_root` or each file's folder."""
    for path in expand_sources(cfg.source, suffixes):
        resolve = resolver_for(cfg, path)
        reader = iter_json_array(path) if path.suffix.lower() == ".json" else iter_jsonl(path)
        for i, (loc, obj) in enumerate(reader):
            yield record_from_obj(obj, loc, f"{path.stem}-{i}", resolve)
