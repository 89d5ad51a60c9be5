"""An OpenAI-compatible chat completions server for an r1v model (VLM or causal LM) on r1v's rollout engine.

    python -m r1v.serve.openai_server --model DIR --port 8000 [--served-model-name NAME] [--api-key-env VAR]

Why it exists: the `openai` scorer (and any OpenAI client) can talk to an r1v checkpoint the way it talks to vLLM,
so the judge path is tested end to end on a real server with a real model, on CPU. It is the stdlib's threaded
HTTP server around one `TransformersEngine` (requests are served one model call at a time); production judges
run on vLLM or Ray Serve behind the same API.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (messages with text and `image_url`
parts given as data URLs; `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `n`, `seed`, `stop`,
vLLM's `repetition_penalty` and `guided_choice`: the choice the model finds most likely, by the summed
log-probability of its tokens after the prompt). Errors are OpenAI-style JSON with status 400/401/404.

`--allow-faults` (tests only) makes the server misbehave on request: a marker `[[fault:KIND]]` in a message's
text answers 500 (`500`), a truncated JSON body (`garbage`) or sleeps S seconds before answering (`sleep=S`);
`KIND-once` misbehaves on the first request with that body only. `GET /r1v/stats` counts requests and faults.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from r1v.core.config import PreprocessConfig

FAULT = re.compile(r"\[\[fault:([a-z0-9]+(?:-once)?)(?:=([0-9.]+))?\]\]")
DEFAULT_MAX_TOKENS = 256


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _data_url(url: str) -> bytes:
    m = re.match(r"data:[\w/+.-]*(;[\w=-]+)*;base64,(.*)$", url, re.DOTALL)
    if not m:
        raise HTTPError(400, "only base64 data: image URLs are accepted (this server fetches nothing)")
    try:
        return base64.b64decode(m.group(2), validate=True)
    except ValueError as e:
        raise HTTPError(400, f"image data URL is not valid base64: {e}") from None


def parse_messages(messages: Any) -> tuple[list[dict[str, str]], list[bytes]]:
    """OpenAI messages -> r1v messages (`<image>` where each image part was) and the image bytes in order."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list")
    out: list[dict[str, str]] = []
    images: list[bytes] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HTTPError(400, f"messages[{i}] must be an object")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise HTTPError(400, f"messages[{i}].role {m.get('role')!r} is not supported")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text":
                    parts.append(str(p.get("text", "")))
                elif kind == "image_url":
                    ref = p.get("image_url")
                    images.append(_data_url(ref.get("url", "") if isinstance(ref, dict) else str(ref)))
                    parts.append("<image>")
                else:
                    raise HTTPError(400, f"messages[{i}].content[{j}]: unsupported part type {kind!r}")
            text = "\n".join(parts)
        else:
            raise HTTPError(400, f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": role, "content": text})
    return out, images


class ChatModel:
    """One engine and the request -> completion logic, independent of HTTP (so tests and apps can reuse it)."""

    def __init__(self, model_dir: str, name: str | None = None, max_batch: int = 16, dtype: str = "float32",
                 max_tiles: int = 6, max_length: int = 8192) -> None:
        # imported on use, to keep torch, numpy, tqdm out of light paths
        from r1v.generation.engines import TransformersEngine

        self.model_dir = str(model_dir)
        self.name = name or Path(model_dir).name
        self.engine = TransformersEngine(self.model_dir, max_batch=max_batch, logprobs=False, dtype=dtype)
        self.pre = PreprocessConfig(max_tiles=max_tiles, max_length=max_length)
        self.lock = threading.Lock()

    def encode(self, messages: list[dict[str, str]], images: list[bytes]) -> Any:
        # imported on use, to keep torch, transformers, pyarrow out of light paths
        from r1v.data.pipeline import RowError, preprocess_row
        from r1v.data.prompt import encode_prompt
        from r1v.generation.engines import Request

        try:
            if self.engine.vision:
                enc = preprocess_row({"messages": messages, "images": images}, self.model_dir, self.pre,
                                     with_labels=False)
                return Request(enc["input_ids"], enc["pixel_values"], enc["n_tiles"])
            if images:
                raise HTTPError(400, f"model {self.name!r} is text-only: remove the image parts")
            ids = encode_prompt(messages, self.engine.tok, [], 1)
        except RowError as e:
            raise HTTPError(400, f"{e.reason}: {e.detail}") from None
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        if len(ids) > self.pre.max_length:
            raise HTTPError(400, f"prompt has {len(ids)} tokens, max_length is {self.pre.max_length}")
        return Request(ids)

    def choose(self, req: Any, choices: list[str]) -> str:
        """The choice with the highest summed log-probability of its tokens after the prompt."""
        # imported on use, to keep torch, transformers, pyarrow out of light paths
        import torch

        from r1v.data.collate import tiles_from_bytes
        from r1v.model.forward import normalize_pixels

        tok, model = self.engine.tok, self.engine.model
        conts = [tok(ch, add_special_tokens=False)["input_ids"] for ch in choices]
        if any(not c for c in conts):
            raise HTTPError(400, "guided_choice entries must be non-empty")
        longest = len(req.prompt_ids) + max(len(c) for c in conts)
        ids = torch.full((len(conts), longest), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(conts):
            seq = req.prompt_ids + c
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        dev = self.engine.device
        kwargs: dict[str, Any] = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        if req.n_tiles:
            tiles = torch.from_numpy(tiles_from_bytes(req.pixel_values, req.n_tiles, self.engine.tile).copy())
            kwargs["pixel_values"] = normalize_pixels(tiles.repeat(len(conts), 1, 1, 1).to(self.engine.device),
                                                      model.dtype)
        with torch.no_grad():
            logp = torch.log_softmax(model(**kwargs).logits.float(), -1).cpu()
        start = len(req.prompt_ids)
        totals = [sum(float(logp[j, start + k - 1, t]) for k, t in enumerate(c)) for j, c in enumerate(conts)]
        return choices[max(range(len(choices)), key=totals.__getitem__)]

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat.completion for a request body, or HTTPError."""
        model = body.get("model")
        if model not in (None, self.name):
            raise HTTPError(404, f"the model {model!r} does not exist (this server serves {self.name!r})",
                            "not_found_error")
        messages, images = parse_messages(body.get("messages"))
        req = self.encode(messages, images)
        try:
            n = int(body.get("n") or 1)
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS)
            sampling = {"temperature": float(body.get("temperature", 1.0)), "top_p": float(body.get("top_p", 1.0)),
                        "max_new_tokens": max_tokens,
                        "repetition_penalty": float(body.get("repetition_penalty", 1.0))}
            seed = int(body.get("seed") or 0)
        except (TypeError, ValueError) as e:
            raise HTTPError(400, f"bad sampling parameter: {e}") from None
        if not 1 <= n <= 64 or max_tokens < 1 or sampling["temperature"] < 0 or not 0 < sampling["top_p"] <= 1:
            raise HTTPError(400, "need 1 <= n <= 64, max_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        guided = body.get("guided_choice")
        with self.lock:
            if guided is not None:
                if not isinstance(guided, list) or not guided or not all(isinstance(g, str) for g in guided):
                    raise HTTPError(400, "guided_choice must be a non-empty list of strings")
                best = self.choose(req, guided)
                outs = [(best, "stop", len(self.engine.tok(best, add_special_tokens=False)["input_ids"]))] * n
            else:
                comps = self.engine.generate([req], sampling, n, seed)[0]
                outs = [(cp.text, "stop" if cp.finished else "length", len(cp.token_ids)) for cp in comps]
        choices = []
        for i, (text, finish, _) in enumerate(outs):
            cut = min((text.find(s) for s in stops if s and s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish, "logprobs": None})
        used = sum(k for _, _, k in outs)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": used,
                          "total_tokens": len(req.prompt_ids) + used}}


class Faults:
    """Test-only misbehaviour keyed by markers in the request (see the module doc)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def pick(self, raw: bytes, body: dict[str, Any]) -> tuple[str, float] | None:
        text = json.dumps(body.get("messages"))
        m = FAULT.search(text)
        if not m:
            return None
        kind, arg = m.group(1), float(m.group(2) or 0)
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


def make_handler(chat: ChatModel, api_key: str | None, faults: Faults | None) -> type[BaseHTTPRequestHandler]:
    stats: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "r1v-openai/0.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the stdlib's signature)
            if os.environ.get("R1V_SERVE_VERBOSE"):
                super().log_message(format, *args)

        def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to do
                pass

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode())

        def _error(self, e: HTTPError) -> None:
            self._json(e.status, {"error": {"message": e.message, "type": e.kind, "code": e.status}})

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "r1v"}]})
            elif self.path == "/r1v/stats" and faults is not None:
                self._json(200, {**stats, **faults.counts})
            else:
                self._error(HTTPError(404, f"no route {self.path}", "not_found_error"))

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            stats["requests"] += 1
            if self.path != "/v1/chat/completions":
                return self._error(HTTPError(404, f"no route {self.path}", "not_found_error"))
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self._error(HTTPError(401, "missing or wrong API key", "authentication_error"))
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as e:
                return self._error(HTTPError(400, f"request body is not JSON: {e}"))
            fault = faults.pick(raw, body) if faults is not None else None
            if fault and fault[0] == "500":
                return self._error(HTTPError(500, "injected fault: internal error", "server_error"))
            if fault and fault[0] == "garbage":
                return self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "Sco')
            if fault and fault[0] == "sleep":
                time.sleep(fault[1])
            try:
                self._json(200, chat.complete(body))
            except HTTPError as e:
                self._error(e)
            except Exception as e:  # noqa: BLE001  (a server answers 500, it does not die)
                self._error(HTTPError(500, f"{type(e).__name__}: {e}", "server_error"))

    return Handler


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                allow_faults: bool = False) -> ThreadingHTTPServer:
    """A bound, not yet serving, threaded server (port 0: a free port; see `server_address`)."""
    server = ThreadingHTTPServer((host, port), make_handler(chat, api_key, Faults() if allow_faults else None))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m r1v.serve.openai_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="r1v VLM or causal LM directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    ap.add_argument("--served-model-name", default=None, help="default: the model directory's name")
    ap.add_argument("--api-key-env", default=None, help="require `Authorization: Bearer $VAR`")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--allow-faults", action="store_true", help="tests only: honour [[fault:...]] markers")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    key = None
    if a.api_key_env:
        key = os.environ.get(a.api_key_env)
        if not key:
            ap.error(f"--api-key-env: environment variable {a.api_key_env!r} is not set")
    chat = ChatModel(a.model, a.served_model_name, a.max_batch, a.dtype, a.max_tiles)
    server = make_server(chat, a.host, a.port, key, a.allow_faults)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = server.server_address[:2]
    print(f"r1v openai server: model {chat.name!r} listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
