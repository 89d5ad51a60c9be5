"""The server's guards, shared by the front (`r1v.serve.front`) and the replicas (`r1v.serve.app`): OpenAI-style
errors, API keys (from an environment variable or a file only; kept as SHA-256 digests, compared in constant
time), the request body read under a size cap and a deadline, and images (data URLs; remote URLs only from
allow-listed hosts; pixel counts read from the header before anything is decoded).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from r1v.serve.config import DEFAULT_KEY_ENV, LimitsConfig, ServeConfig, is_loopback

MIN_KEY_CHARS = 16
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""Image formats accepted (PIL's names): the common ones, not every decoder PIL carries."""


class ServeError(Exception):
    """An answer other than 200, in OpenAI's error schema: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 502: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StartupError(ValueError):
    """A configuration the server refuses to start with; the message says why and what to change."""


INTERNAL = "internal error: the server could not complete the request (details are in the server's log)"


# ------------------------------------------------------------------------------------------------- API keys


def _split_keys(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            keys += [k for k in re.split(r"[\s,]+", line) if k]
    return keys


def load_keys(cfg: ServeConfig, environ: dict[str, str] | None = None) -> list[str]:
    """The API keys the config points to (an environment variable and/or a file); [] when none is configured.
    A variable or file that is named but missing or empty, a key file other users can read, or a key shorter than
    MIN_KEY_CHARS is a StartupError (its message never contains a key)."""
    env = os.environ if environ is None else environ
    keys: list[str] = []
    if cfg.api_key_env is not None:
        if not env.get(cfg.api_key_env, "").strip():
            raise StartupError(f"api_key_env: the environment variable {cfg.api_key_env} is not set (or empty)")
        keys += _split_keys(env[cfg.api_key_env])
    elif env.get(DEFAULT_KEY_ENV, "").strip():
        keys += _split_keys(env[DEFAULT_KEY_ENV])
    if cfg.api_key_file is not None:
        p = Path(cfg.api_key_file)
        try:
            mode = p.stat().st_mode
            text = p.read_text()
        except OSError as e:
            raise StartupError(f"api_key_file {p}: cannot read it ({e.strerror})") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
            raise StartupError(f"api_key_file {p}: readable or writable by other users (mode {stat.filemode(mode)}): "
                               f"chmod 600 it")
        from_file = _split_keys(text)
        if not from_file:
            raise StartupError(f"api_key_file {p}: holds no key")
        keys += from_file
    short = sum(len(k) < MIN_KEY_CHARS for k in keys)
    if short:
        raise StartupError(f"{short} API key(s) shorter than {MIN_KEY_CHARS} characters: use long random keys "
                           "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return keys


def key_digests(keys: Iterable[str]) -> list[bytes]:
    """What the server holds of its keys: their SHA-256 digests (the keys themselves go to no replica or log)."""
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def check_startup(cfg: ServeConfig, digests: list[bytes]) -> None:
    """Refuse to listen on a non-loopback address without API keys."""
    if not is_loopback(cfg.host) and not digests:
        raise StartupError(f"host {cfg.host!r} is not a loopback address and no API key is configured: anyone who "
                           f"can reach it could use the model. Set {DEFAULT_KEY_ENV} (or api_key_env / "
                           "api_key_file), or serve on 127.0.0.1")


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lower case) in ASGI headers."""
    return next((v for k, v in headers if k == name), None)


def authorized(digests: list[bytes], authorization: bytes | None) -> bool:
    """Whether `Authorization: Bearer KEY` carries one of the keys (always, when there are no keys). The digest of
    the offered key is compared with every stored digest, each in constant time (hmac.compare_digest), and all are
    compared, so neither the key nor which key matched shows in the timing."""
    if not digests:
        return True
    if not authorization or not authorization[:7].lower() == b"bearer ":
        return False
    offered = hashlib.sha256(authorization[7:].strip()).digest()
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(offered, d)
    return ok


def require_key(digests: list[bytes], headers: Iterable[tuple[bytes, bytes]]) -> None:
    if not authorized(digests, header(headers, b"authorization")):
        raise ServeError(401, "missing or invalid API key: send `Authorization: Bearer KEY`", code="invalid_api_key")


# ------------------------------------------------------------------------------------------------- the body


def check_length(headers: Iterable[tuple[bytes, bytes]], limit: int) -> int | None:
    """The declared Content-Length (None: not given), refused with 413 above `limit` before any body is read."""
    raw = header(headers, b"content-length")
    if raw is None:
        return None
    try:
        n = int(raw)
        if n < 0:
            raise ValueError
    except ValueError:
        raise ServeError(400, "Content-Length is not a non-negative integer") from None
    if n > limit:
        raise ServeError(413, f"request body of {n} bytes is over the limit of {limit} bytes (limits.max_body_bytes)",
                         code="request_too_large")
    return n


async def read_capped(chunks: AsyncIterator[bytes], limit: int, timeout_s: float) -> bytes:
    """The body from `chunks`, refused with 413 as soon as it passes `limit` bytes (nothing more is read) and with
    408 when it has not all arrived within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    buf = bytearray()
    it = chunks.__aiter__()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServeError(408, f"the request body did not arrive within {timeout_s:g} s (limits.body_timeout_s)")
        try:
            chunk = await asyncio.wait_for(it.__anext__(), left)
        except StopAsyncIteration:
            return bytes(buf)
        except TimeoutError:
            raise ServeError(408, f"the request body did not arrive within {timeout_s:g} s "
                             "(limits.body_timeout_s)") from None
        buf += chunk
        if len(buf) > limit:
            raise ServeError(413, f"request body is over the limit of {limit} bytes (limits.max_body_bytes)",
                             code="request_too_large")


# ------------------------------------------------------------------------------------------------- images

_DATA_URL = re.compile(r"data:([\w/+.-]*)((?:;[\w=.+-]+)*);base64,(.*)$", re.DOTALL)


def image_header(data: bytes, limits: LimitsConfig, where: str) -> tuple[int, int]:
    """(width, height) of an image from its header alone; refuses unknown formats, unreadable headers and more
    than `limits.max_image_pixels` pixels. Nothing is decoded here (PIL's `open` reads only the header)."""
    # imported on use, to keep PIL out of light paths
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ServeError(400, f"{where}: not a readable image ({type(e).__name__}); accepted formats: "
                         f"{', '.join(IMAGE_FORMATS)}", param=where, code="invalid_image") from None
    except Image.DecompressionBombError:
        w = h = limits.max_image_pixels + 1  # PIL's own guard fired first: refuse it as ours
    if w * h > limits.max_image_pixels:
        raise ServeError(400, f"{where}: image of {w}x{h} pixels is over the limit of {limits.max_image_pixels} "
                         "pixels (limits.max_image_pixels)", param=where, code="image_too_large")
    if w < 1 or h < 1:
        raise ServeError(400, f"{where}: empty image ({w}x{h})", param=where, code="invalid_image")
    return w, h


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether `url` is http(s) on a host (or host:port) of `allowed`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    names = {a.lower().strip("/") for a in allowed}
    return host in names or f"{host}:{port}" in names


def decode_data_url(url: str, where: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise ServeError(400, f"{where}: a data URL must read data:image/...;base64,...", param=where,
                         code="invalid_image_url")
    try:
        return base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"{where}: the data URL's payload is not valid base64", param=where,
                         code="invalid_base64") from None


async def fetch_image(url: str, limits: LimitsConfig, where: str) -> bytes:
    """GET an allow-listed image URL: no redirects, at most `max_body_bytes`, within `image_fetch_timeout_s`."""
    # imported on use, to keep aiohttp out of light paths
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=limits.image_fetch_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url, allow_redirects=False) as r:
            if r.status != 200:
                raise ServeError(400, f"{where}: fetching the image answered HTTP {r.status}", param=where,
                                 code="image_fetch_failed")
            buf = bytearray()
            async for chunk in r.content.iter_chunked(65536):
                buf += chunk
                if len(buf) > limits.max_body_bytes:
                    raise ServeError(400, f"{where}: the image is over {limits.max_body_bytes} bytes", param=where,
                                     code="image_too_large")
            return bytes(buf)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ServeError(400, f"{where}: the image could not be fetched ({type(e).__name__})", param=where,
                         code="image_fetch_failed") from None


async def image_bytes(url: Any, limits: LimitsConfig, where: str) -> bytes:
    """The bytes of an `image_url`: a data URL's payload, or (only for an allow-listed host) a fetched image, its
    header checked (`image_header`). Every other URL is refused without any network access."""
    if not isinstance(url, str) or not url:
        raise ServeError(400, f"{where}: image_url.url must be a non-empty string", param=where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, where)
    elif scheme in ("http", "https") and limits.allowed_image_hosts and host_allowed(url, limits.allowed_image_hosts):
        data = await fetch_image(url, limits, where)
    elif scheme in ("http", "https"):
        hint = ("no remote image hosts are allowed (limits.allowed_image_hosts is empty)"
                if not limits.allowed_image_hosts else "its host is not in limits.allowed_image_hosts")
        raise ServeError(400, f"{where}: remote image URLs are refused: {hint}; send the image as a base64 data URL",
                         param=where, code="image_url_refused")
    else:
        raise ServeError(400, f"{where}: {scheme or 'this'} URLs are refused; send the image as a base64 data URL",
                         param=where, code="image_url_refused")
    image_header(data, limits, where)
    return data
