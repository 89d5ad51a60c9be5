"""The front: the only socket `r1v serve` opens to clients, in front of Ray Serve's HTTP proxy.

Why it exists: Ray Serve's proxy reads a request's whole body into memory as fast as the client sends it, whatever
the application does (`proxy_asgi_receive` in ray/serve/_private/proxy.py), and honours per-request headers that
lift its timeout (`x-request-timeout-seconds`). So the checks that must come before the body is read live here,
on a uvicorn server whose h11 protocol reads no further than the application asks (64 KiB of buffer):
- the API key, from the headers alone (401, nothing of the body read);
- Content-Length over `limits.max_body_bytes` (413 before any body byte is read); a body without one is cut at
  that size (413); a body that has not arrived within `limits.body_timeout_s` gets 408;
- a request head not complete within `limits.header_timeout_s` of connecting (or of the previous request) gets
  the connection closed (slow-header clients); idle keep-alive connections close after `limits.keep_alive_s`;
  at most `limits.max_connections` at once (503 beyond);
- unknown routes get 404 without reading anything.
A checked request goes to Serve's proxy (bound to 127.0.0.1) with only the headers the API needs; the replicas
check key and body again (`r1v.serve.chat.ChatService.chat`). An upstream answer that is not the application's
JSON or event stream (the proxy's own plain-text errors) is replaced by an OpenAI-style error that names nothing
internal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from r1v.serve.config import ServeConfig
from r1v.serve.limits import INTERNAL, ServeError, check_length, read_capped, require_key

log = logging.getLogger("r1v.serve.front")

ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET", "/r1v/stats": "GET"}
OPEN = {"/health"}  # answered without a key (load balancers' health checks)
FORWARD_HEADERS = (b"authorization", b"content-type", b"accept")


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request head is not complete within
    `header_timeout_s` of the connection's start, or of its first byte after a previous request."""

    class GuardedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


async def _json(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


async def _body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ServeError(400, "the client disconnected")
        yield msg.get("body", b"")
        if not msg.get("more_body"):
            return


class Front:
    """The ASGI application of the front (see the module doc)."""

    def __init__(self, upstream: str, cfg: ServeConfig, digests: list[bytes]) -> None:
        self.upstream, self.cfg, self.digests = upstream.rstrip("/"), cfg, list(digests)
        self.session: aiohttp.ClientSession | None = None

    async def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            lim = self.cfg.limits
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=lim.request_timeout_s + lim.image_fetch_timeout_s + 30,
                                              sock_connect=10),
                connector=aiohttp.TCPConnector(limit=lim.max_connections), auto_decompress=False)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started: list[bool] = []

        async def tracked_send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                started.append(True)
            await send(msg)

        try:
            await self._handle(scope, receive, tracked_send)
        except ServeError as e:
            if not started:
                await _json(send, e.status, e.body())
        except Exception:  # noqa: BLE001  (answer 500 without internals; the log has them)
            log.exception("front: request failed")
            if not started:
                await _json(send, 500, ServeError(500, INTERNAL).body())

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, method, headers = scope["path"], scope["method"], scope["headers"]
        lim = self.cfg.limits
        if path not in OPEN:
            require_key(self.digests, headers)  # from the headers: no byte of the body has been read
        if path not in ROUTES:
            raise ServeError(404, f"no route {path}", code="not_found")
        if method != ROUTES[path]:
            raise ServeError(405, f"{path} takes {ROUTES[path]}", code="method_not_allowed")
        body = b""
        if method == "POST":
            check_length(headers, lim.max_body_bytes)
            body = await read_capped(_body(receive), lim.max_body_bytes, lim.body_timeout_s)
        fwd = {k.decode(): v.decode("latin-1") for k, v in headers if k in FORWARD_HEADERS}
        session = await self._session()
        try:
            async with session.request(method, self.upstream + path, data=body if method == "POST" else None,
                                       headers=fwd, allow_redirects=False) as r:
                ctype = r.headers.get("content-type", "")
                if not (ctype.startswith("application/json") or ctype.startswith("text/event-stream")):
                    # Serve's own answers (no replica yet, its timeout, an unhandled error) are plain text
                    status = r.status if r.status >= 400 else 502
                    msg = ("the model server is not ready or overloaded; retry later" if status in (503, 429)
                           else INTERNAL)
                    raise ServeError(status, msg)
                if ctype.startswith("application/json"):  # the application's own answer: whole, with its length
                    payload = await r.read()
                    await send({"type": "http.response.start", "status": r.status,
                                "headers": [(b"content-type", ctype.encode()),
                                            (b"content-length", str(len(payload)).encode())]})
                    await send({"type": "http.response.body", "body": payload})
                    return
                await send({"type": "http.response.start", "status": r.status,
                            "headers": [(b"content-type", ctype.encode()), (b"cache-control", b"no-cache")]})
                async for chunk in r.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            log.warning("front: upstream %s %s: %s", method, path, type(e).__name__)
            raise ServeError(503, "the model server is not reachable; retry later") from None
        except TimeoutError:
            raise ServeError(504, "the model server did not answer in time") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def server(app: Front, cfg: ServeConfig) -> Any:
    """The uvicorn server of the front (run it with `.run(sockets=[bind(...)])`)."""
    import uvicorn

    lim = cfg.limits
    config = uvicorn.Config(app, http=guarded_h11(lim.header_timeout_s), timeout_keep_alive=lim.keep_alive_s,
                            limit_concurrency=lim.max_connections, access_log=False, log_config=None,
                            lifespan="on", server_header=False, date_header=True, ws="none",
                            h11_max_incomplete_event_size=32 * 1024)
    return uvicorn.Server(config)
