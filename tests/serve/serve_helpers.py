"""Helpers of the serving tests: images, raw HTTP, uvicorn servers run in threads of the test process."""

from __future__ import annotations

import base64
import functools
import io
import socket
import struct
import threading
import time
import zlib
from typing import Any

from r1v_test_servers import SERVE_KEY, processes_under, r1v_serve  # noqa: F401  (the serving tests' helpers)

from r1v.core.config import EvalEngineConfig, PreprocessConfig
from r1v.data.pipeline import preprocess_row
from r1v.generation.engines import Request
from r1v.generation.service import GREEDY, make_engine

KEY = SERVE_KEY


def png(w: int = 80, h: int = 60, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "PNG")
    return b.getvalue()


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A PNG whose header claims w x h pixels, followed by a few bytes of zeros: decoding it would need w*h*3 bytes
    of memory, its header alone says so."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What is shown?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 30.0) -> tuple[int, bytes, float]:
    """Send `head` (request line + headers, without the blank line) and `body`; (status, response body, seconds to
    the response). Reads until the server closes or the declared length arrived."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
        took = time.monotonic() - t0
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(ln.split(b":", 1)[1]) for ln in head_part.split(b"\r\n")
                       if ln.lower().startswith(b"content-length:")), None)
        while length is not None and len(rest) < length:
            part = s.recv(65536)
            if not part:
                break
            rest += part
    status = int(head_part.split(b" ", 2)[1]) if head_part else 0
    return status, rest, took


def post_head(path: str = "/v1/chat/completions", length: int | None = None, key: str | None = KEY,
              extra: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Content-Type: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}".encode())
    if length is not None:
        lines.append(f"Content-Length: {length}".encode())
    if extra:
        lines.append(extra)
    return b"\r\n".join(lines)


class ThreadServer:
    """A uvicorn.Server running in a daemon thread on a bound socket."""

    def __init__(self, server: Any, host: str = "127.0.0.1") -> None:
        from r1v.serve.front import bind

        self.server = server
        self.sock = bind(host, 0)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def plain_server(app: Any) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, access_log=False, log_config=None, lifespan="off", http="h11"))


@functools.lru_cache(maxsize=2)
def _engine(model: str) -> Any:
    class Spec:
        engine = EvalEngineConfig(num_cpus=1, max_batch=8)
        torch_threads = 1

    return make_engine(model, Spec())


def _request(model: str, image: bytes | None, text: str) -> Request:
    content, images = (f"<image>\n{text}", [image]) if image is not None else (text, [])
    enc = preprocess_row({"messages": [{"role": "user", "content": content}], "images": images}, model,
                         PreprocessConfig(max_tiles=2, max_length=1024), with_labels=False)
    return Request(enc["input_ids"], enc["pixel_values"], enc["n_tiles"])


def expected_greedy(model: str, image: bytes | None, text: str, max_tokens: int, **sampling: Any) -> str:
    """The engine run directly (no server): the prompt (`text` after the image, if any) encoded by the data
    pipeline, greedy (with `sampling`'s other settings: the repetition penalty and its scope)."""
    comp = _engine(model).generate([_request(model, image, text)],
                                   {**GREEDY, "max_new_tokens": max_tokens, **sampling}, 1, 0)[0][0]
    return comp.text


def choice_logprobs(model: str, image: bytes, text: str, choices: list[str]) -> list[float]:
    """The engine run directly: each choice's summed log-probability after the prompt."""
    engine = _engine(model)
    return engine.continuation_logprobs(_request(model, image, text),
                                        [engine.tok(c, add_special_tokens=False)["input_ids"] for c in choices])
