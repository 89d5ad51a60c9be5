"""A test-only HTTP proxy that sits in front of a real server (`r1v serve`) and misbehaves on request.

The product server has no fault switches: the faults a client must survive are injected here, between the
client and the server. A marker `[[fault:KIND]]` anywhere in a POST body picks the fault:
- `500`: answers 500 (OpenAI's error schema) without forwarding;
- `garbage`: answers 200 with a truncated JSON body without forwarding;
- `sleep=S`: waits S seconds, then forwards (a client with a shorter timeout has given up by then);
- `drop`: closes the connection without an answer;
- `KIND-once`: the fault on the first request with that exact body only; later ones are forwarded.
Everything else (and every GET) is forwarded as it is, so 401s, 404s and the answers are the real server's.
`GET /_faults` (answered by the proxy) counts `requests_KIND` (marked requests) and `faults_KIND` (faults done).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULT = re.compile(rb"\[\[fault:([a-z0-9]+(?:-once)?)(?:=([0-9.]+))?\]\]")
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-connection", "host", "content-length"}


class FaultProxy:
    """`FaultProxy(upstream)`: listening on 127.0.0.1 (`url`) in daemon threads until `stop()`."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.host, self.port = u.hostname, u.port
        self.seen: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def pick(self, raw: bytes) -> tuple[str, float] | None:
        m = FAULT.search(raw)
        if not m:
            return None
        kind, arg = m.group(1).decode(), float(m.group(2) or 0)
        digest = hashlib.sha256(raw).hexdigest()
        with self.lock:
            self.counts[f"requests_{kind}"] += 1
            if kind.endswith("-once"):
                if digest in self.seen:
                    return None
                self.seen.add(digest)
                kind = kind.removesuffix("-once")
            self.counts[f"faults_{kind}"] += 1
        return kind, arg

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the stdlib's signature)
                pass

            def _send(self, status: int, payload: bytes, headers: list[tuple[str, str]] | None = None) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers or [("Content-Type", "application/json")]:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    self.close_connection = True

            def _forward(self, raw: bytes | None) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=300)
                try:
                    conn.request(self.command, self.path, body=raw, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                    kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
                except OSError as e:
                    return self._send(502, json.dumps({"error": {"message": f"proxy: upstream {e}",
                                                                  "type": "server_error"}}).encode())
                finally:
                    conn.close()
                self._send(resp.status, body, kept)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/_faults":
                    return self._send(200, json.dumps(proxy.stats()).encode())
                self._forward(None)

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.pick(raw)
                if fault and fault[0] == "500":
                    return self._send(500, b'{"error": {"message": "injected fault", "type": "server_error"}}')
                if fault and fault[0] == "garbage":
                    return self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "Sco')
                if fault and fault[0] == "drop":
                    self.close_connection = True
                    return
                if fault and fault[0] == "sleep":
                    time.sleep(fault[1])
                self._forward(raw)

        return Handler
