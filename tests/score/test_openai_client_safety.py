"""The `openai` scorer's client against hostile servers: a redirect to another origin, a server that drips its
reply, a reply too large to hold, and connection reuse. Each server is a few lines of the standard library on
127.0.0.1, started and stopped here; no traffic leaves the loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from score_corpora import row

from r1v.core.judges import SCORERS
from r1v.judges.openai_client import OpenAIScorerConfig

KEY_ENV = "R1V_TEST_SAFETY_KEY"
KEY = "sk-safety-secret"
REPLY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Score: 5"}}]}).encode()


@pytest.fixture(autouse=True)
def _key(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@contextmanager
def serve(handle: Callable[[BaseHTTPRequestHandler], None], http11: bool = False) -> Iterator[str]:
    """A server on 127.0.0.1 whose POSTs run `handle(handler)`; yields its base URL (…/v1)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if http11 else "HTTP/1.0"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            handle(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def scorer(url: str, **kw: Any):
    cfg = OpenAIScorerConfig(**{"base_url": url, "model": "judge", "api_key_env": KEY_ENV, "prompt": "{question}",
                                "retries": 0, "backoff_s": 0.01, "timeout_s": 5.0, "concurrency": 1, **kw})
    return SCORERS.get("openai")(cfg, 0, 5)


def reply(h: BaseHTTPRequestHandler, body: bytes = REPLY) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_not_followed_and_the_key_goes_nowhere_else(status: int) -> None:
    seen: list[dict[str, str]] = []

    def sink(h: BaseHTTPRequestHandler) -> None:  # another origin: records what reaches it, answers a good score
        seen.append(dict(h.headers))
        reply(h)

    with serve(sink) as sink_url:
        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", sink_url + "/chat/completions")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with serve(redirect) as url, scorer(url, retries=2) as s:
            v = s.score([row("r")])[0]
            stats = s.stats()
    assert seen == []  # not a single request reached the sink: no key, no prompt
    assert all(KEY not in json.dumps(h) for h in seen)
    assert v.score is None and v.reason == "http_error"
    assert f"HTTP {status}" in v.detail and "redirect" in v.detail and sink_url in v.detail
    assert stats["judge_requests"] == 1  # a 3xx is not retried


def _drip(h: BaseHTTPRequestHandler, data: bytes, stop: threading.Event, most: int = 6) -> None:
    """`data` a byte a second, `most` bytes at most (then the connection closes: a client without a deadline
    fails after ~6 s instead of hanging for minutes)."""
    for i in range(min(len(data), most)):
        if stop.wait(1.0):
            return
        try:
            h.wfile.write(data[i:i + 1])
            h.wfile.flush()
        except OSError:  # the client gave up
            return


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_server_times_out_within_one_deadline(where: str) -> None:
    """One byte a second, each within any per-read timeout: the request's deadline still ends it."""
    stop = threading.Event()
    body = b'{"choices": [{"message": {"content": "Score: 5"}}], "pad": "' + b"x" * 20 + b'"}'
    head = f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    def dripping(h: BaseHTTPRequestHandler) -> None:
        if where == "body":
            h.wfile.write(head)
            h.wfile.flush()
            _drip(h, body, stop)
        else:
            _drip(h, head + body, stop)

    timeout_s = 2.0
    with serve(dripping) as url, scorer(url, timeout_s=timeout_s) as s:
        t0 = time.monotonic()
        v = s.score([row("r")])[0]
        elapsed = time.monotonic() - t0
        stop.set()
    assert v.score is None and v.reason == "timeout", v
    assert elapsed < timeout_s + 1, f"timed out after {elapsed:.1f} s, not within {timeout_s} + 1 s"


BIG = 64 * 2**20


@pytest.mark.parametrize("length", [False, True], ids=["streamed", "content_length"])
def test_an_oversize_reply_is_bad_reply_and_not_read_whole(length: bool) -> None:
    """A valid chat completion padded to 64 MiB, sent in 64 KiB writes; the server counts what it got out
    before the client hung up (its socket buffers hold a few MiB at most)."""
    sent: list[int] = []
    done = threading.Event()
    head, tail = b'{"choices": [{"message": {"content": "Score: 5"}}], "pad": "', b'"}'
    chunk = b"x" * 2**16

    def huge(h: BaseHTTPRequestHandler) -> None:
        n = 0
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            if length:
                h.send_header("Content-Length", str(BIG))
            h.end_headers()  # without a length, HTTP/1.0: the body ends when the connection closes
            h.wfile.write(head)
            n = len(head)
            while n + len(chunk) + len(tail) <= BIG:
                h.wfile.write(chunk)
                n += len(chunk)
            h.wfile.write(b"x" * (BIG - n - len(tail)) + tail)
            n = BIG
        except OSError:
            pass
        finally:
            sent.append(n)
            done.set()

    cap = 2**18
    with serve(huge) as url, scorer(url, max_reply_bytes=cap) as s:
        v = s.score([row("r")])[0]
    assert done.wait(20), "the server is still sending"
    assert v.score is None and v.reason == "bad_reply", v
    assert f"max_reply_bytes {cap}" in v.detail
    assert ("Content-Length" in v.detail) == length  # a declared size is refused before the body is read
    assert sent[0] < BIG // 2, f"the server got {sent[0]} of {BIG} bytes out: the client read on past its cap"


def test_one_connection_serves_many_rows_and_is_closed_at_the_end() -> None:
    peers: list[tuple[str, int]] = []

    def ok(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        reply(h)

    with serve(ok, http11=True) as url:
        with scorer(url, concurrency=1) as s:
            verdicts = s.score([row(f"r{i}") for i in range(6)])
            client = s._http
        assert [v.score for v in verdicts] == [5.0] * 6
        assert len(peers) == 6 and len(set(peers)) == 1  # kept alive and reused across rows
        assert s._http is None and client is not None and client.is_closed
