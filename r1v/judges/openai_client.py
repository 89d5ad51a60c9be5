"""The `openai` scorer: a judge or reward model behind any OpenAI-compatible chat endpoint (vLLM, `r1v serve`).

Each row becomes one chat request (the config's prompt template, optionally the row's images as data URLs);
the reply's text is parsed for a score. A remote misbehaves in three ways, each handled the same documented way:

- timeout (no complete reply within `timeout_s`), connection refused or dropped, HTTP 408/429/5xx, or a 2xx whose
  body is not a chat completion (malformed JSON, no `choices[0].message.content`, larger than `max_reply_bytes`):
  retried up to `retries` times with exponential backoff and jitter (`Retry-After` honoured); when every attempt
  failed the row is quarantined as `timeout`, `connection_error`, `http_error` or `bad_reply`, with the last error
  as detail;
- another 4xx (a wrong model name, a bad key), or a 3xx: not retried, quarantined as `http_error`;
- a well-formed reply with no score in it: quarantined as `unparsable_score` with the reply's start.

No row is ever given a default score. The stage fails when too many rows are quarantined (a server that is
down), so a systematic failure stops the run instead of emptying the corpus.

What it stands on: httpx (`httpx.Client`), not the `openai` package. The scorer needs the raw exchange, not the
SDK's objects: its own retry schedule and failure codes (the SDK retries on its own, and its errors do not
separate a malformed body from a refused connection the way the quarantine reasons do), the reply's bytes as they
arrive (to stop at a size cap), and a deadline over the whole request, which the SDK's per-phase timeouts are not.
The SDK would sit on httpx anyway (httpx2 in openai 3.x) and need a hand-made client passed in for all of this;
httpx alone is one maintained layer less. On top of httpx, four rules:

- **no redirect is followed** (`follow_redirects=False`): a 3xx is quarantined as `http_error` naming its
  `Location`, so the API key only ever goes to `base_url`'s origin. Proxies and `.netrc` from the environment are
  not used either (`trust_env=False`); TLS trusts the system's store, as Python's `ssl` does (`SSL_CERT_FILE`);
- **one deadline per attempt**: connect, send and every read of the reply run against `timeout_s` from the
  attempt's start (`_DeadlineBackend` bounds each socket operation by the time left), so a server that drips
  a byte a second times out at `timeout_s`, not `timeout_s` per read;
- **a reply's size is capped** (`max_reply_bytes`): a larger `Content-Length`, or a body that grows past the cap,
  is `bad_reply`, and reading stops there (at most one 64 KiB read past the cap). Replies are asked for
  uncompressed (`Accept-Encoding: identity`), and a compressed one is `bad_reply`, so the cap is on what the
  client holds;
- **one client for all rows**: the connection pool (`concurrency` connections, kept alive) is shared by the
  worker threads (httpx's pool is thread-safe), opened in `open` and closed in `close`.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import random
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpcore
import httpx
from pydantic import Field, field_validator

from r1v.judges.base import (
    BAD_REPLY,
    CONNECTION,
    HTTP_ERROR,
    NO_RESPONSE,
    TIMEOUT,
    UNPARSABLE,
    Scorer,
    ScorerConfig,
    TemplateMixin,
    Verdict,
    compile_pattern,
    parse_score,
    render,
    row_fields,
    uses_field,
)
from r1v.model.tokens import IMAGE_MARKER

DEFAULT_JUDGE_PROMPT = (
    "Rate the response to the question from 0 (useless or wrong) to 5 (correct, clear, well reasoned).\n\n"
    "Question:\n{question}\n\nReference answer: {answer}\n\nResponse:\n{response}\n\n"
    "Reply with the score only, as: Score: N"
)


class OpenAIScorerConfig(ScorerConfig, TemplateMixin):
    """An OpenAI-compatible chat endpoint as the judge."""

    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="endpoint root, e.g. http://127.0.0.1:8000/v1 (…/chat/completions is added)")
    model: str = Field(min_length=1, description="model name the server serves")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (sent as a "
                                    "Bearer token); None sends none. Never put the key itself in a config")
    prompt: str = Field(DEFAULT_JUDGE_PROMPT, description="user message template; fields: id, source, answer, "
                        "question, response, meta")
    system: str | None = Field(None, description="optional system message")
    images: bool = Field(False, description="attach the row's images to the user message as data URLs")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    retries: int = Field(3, ge=0, description="further attempts after a retryable failure")
    backoff_s: float = Field(1.0, ge=0, description="first backoff; doubled per retry, jittered, capped")
    max_backoff_s: float = Field(30.0, ge=0)
    timeout_s: float = Field(60.0, gt=0, description="one deadline per request: connect, send and the whole "
                             "reply (not per socket read)")
    max_reply_bytes: int = Field(4 * 2**20, ge=1024, description="largest reply body read; a larger one is "
                                 "`bad_reply` and is read no further")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    extra_body: dict[str, Any] = Field({}, description="merged into each request body, e.g. vLLM's "
                                       "{guided_choice: ['0','1','2','3','4','5']}")
    score_pattern: str | None = Field(None, description="regex with a group around the score; the last match "
                                      "wins (default: a bare number, \\boxed{N} or 'Score: N')")

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("score_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        import re

        try:
            compile_pattern(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class Retryable(Exception):
    """A failed attempt worth repeating; `reason` is the quarantine code if every attempt fails."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


class Fatal(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def image_part(data: bytes) -> dict[str, Any]:
    return {"type": "image_url",
            "image_url": {"url": f"data:{_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"}}


def _retry_after(headers: Any) -> float | None:
    """`Retry-After` in seconds (a number, or an HTTP date), None when absent or unreadable."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- one deadline per request

_deadline = threading.local()
"""`at`: the monotonic time by which the calling thread's current request must be done (None: no deadline).
httpx's sync pool does a request's I/O in the calling thread, so a thread-local reaches every socket call."""

_IO_CHUNK = 64 * 1024


def _time_left(timeout: float | None, exc: type[Exception]) -> float | None:
    """The timeout for one socket operation: httpx's own, shortened to what is left of the request's deadline;
    `exc` when nothing is left."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise exc("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write is bounded by the request's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for i in range(0, len(buffer), _IO_CHUNK):  # each piece bounded by what is left, not the whole buffer
            self._inner.write(buffer[i:i + _IO_CHUNK], _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _time_left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _time_left(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _time_left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport over an httpcore pool whose connections honour the request's deadline (httpx's
    `HTTPTransport` takes no network backend, so its pool is rebuilt with one)."""

    def __init__(self, limits: httpx.Limits) -> None:
        verify = ssl.create_default_context()  # the system's trust store, as urllib used
        super().__init__(verify=verify, limits=limits, trust_env=False)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError(f"httpx {httpx.__version__}: HTTPTransport no longer keeps an httpcore pool in "
                               "`_pool`; the openai scorer's deadline needs updating")
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend())


class _TooLarge(Exception):
    pass


def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    """The body, or _TooLarge as soon as it is known to exceed `cap` bytes (by its Content-Length, or while
    reading: at most one read past the cap)."""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cap:
        raise _TooLarge(f"Content-Length {length} > max_reply_bytes {cap}; not read")
    buf = bytearray()
    for chunk in resp.iter_raw():
        buf += chunk
        if len(buf) > cap:
            raise _TooLarge(f"reply larger than max_reply_bytes {cap}; reading stopped at {len(buf)} bytes")
    return bytes(buf)


def _head(resp: httpx.Response, n: int = 300) -> str:
    """The start of an error reply's body, for the detail (a larger body is cut, never read whole)."""
    buf = bytearray()
    for chunk in resp.iter_raw():
        buf += chunk
        if len(buf) >= n:
            break
    return bytes(buf[:n]).decode("utf-8", "replace")


class OpenAIScorer(Scorer):
    Config = OpenAIScorerConfig

    def __init__(self, config: OpenAIScorerConfig, low: float, high: float) -> None:
        super().__init__(config, low, high)
        self.rx = compile_pattern(config.score_pattern)
        self.url = config.base_url + "/chat/completions"
        self.key: str | None = None
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None

    def open(self) -> None:
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        if c.api_key_env:
            self.key = os.environ.get(c.api_key_env)
            if not self.key:
                raise ValueError(f"scorer.api_key_env: environment variable {c.api_key_env!r} is not set")
        try:
            httpx.URL(self.url)
        except httpx.InvalidURL as e:
            raise ValueError(f"scorer.base_url: {e}") from None
        limits = httpx.Limits(max_connections=c.concurrency, max_keepalive_connections=c.concurrency)
        # follow_redirects=False: a redirect could carry the key to another origin; trust_env=False: no proxy
        # or .netrc credentials from the environment. Each phase's timeout is also cut to the request's deadline.
        self._http = httpx.Client(transport=_DeadlineTransport(limits), timeout=httpx.Timeout(c.timeout_s),
                                  follow_redirects=False, trust_env=False)
        self._pool = ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="r1v-judge")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {f"judge_{k}": float(v) for k, v in self.counts.items()}

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def body(self, row: dict[str, Any]) -> dict[str, Any]:
        """The chat request for one row."""
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        # `<image>` markers are r1v's: images travel as parts (or not at all), so the text carries none.
        text = render(c.prompt, row_fields(row)).replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "")
        content: Any = text
        if c.images and row.get("images"):
            content = [*(image_part(bytes(b)) for b in row["images"]), {"type": "text", "text": text}]
        messages = ([{"role": "system", "content": c.system}] if c.system else []) + [
            {"role": "user", "content": content}]
        return {"model": c.model, "messages": messages, "max_tokens": c.max_tokens,
                "temperature": c.temperature, **c.extra_body}

    def _attempt(self, payload: bytes) -> str:
        """One request, against one deadline; the reply's text, or Retryable / Fatal."""
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        if self._http is None:
            raise RuntimeError("OpenAIScorer: request before open()")
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        self._count("requests")
        _deadline.at = time.monotonic() + c.timeout_s
        try:
            with self._http.stream("POST", self.url, content=payload, headers=headers,
                                   follow_redirects=False) as resp:
                code = resp.status_code
                if 300 <= code < 400:
                    raise Fatal(HTTP_ERROR, f"HTTP {code}: redirect to {resp.headers.get('Location')!r} not "
                                "followed (redirects are never followed, so that the API key goes nowhere but "
                                "base_url); set base_url to the final address")
                if not 200 <= code < 300:
                    detail = f"HTTP {code}: {_head(resp)}"
                    if code in (408, 429) or code >= 500:
                        raise Retryable(HTTP_ERROR, detail, _retry_after(resp.headers))
                    raise Fatal(HTTP_ERROR, detail)
                encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise Retryable(BAD_REPLY, f"reply compressed ({encoding}) although Accept-Encoding: identity "
                                    "was asked; not read")
                raw = _read_capped(resp, c.max_reply_bytes)
        except _TooLarge as e:
            raise Retryable(BAD_REPLY, str(e)) from None
        except httpx.TimeoutException as e:
            raise Retryable(TIMEOUT, f"no complete reply within {c.timeout_s} s ({type(e).__name__}: {e})") from None
        except httpx.TransportError as e:  # refused, reset, closed without a (complete) reply
            raise Retryable(CONNECTION, f"{self.url}: {type(e).__name__}: {e}") from None
        finally:
            _deadline.at = None
        try:
            reply = json.loads(raw)
            text = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise Retryable(BAD_REPLY, f"not a chat completion ({type(e).__name__}: {e}): "
                            f"{raw[:200].decode('utf-8', 'replace')!r}") from None
        if not isinstance(text, str):
            raise Retryable(BAD_REPLY, f"choices[0].message.content is {type(text).__name__}, not text")
        return text

    def reply(self, row: dict[str, Any]) -> str | Verdict:
        """The endpoint's reply text for `row`, or a failed verdict: retries with exponential backoff and
        jitter (honouring Retry-After) on the retryable failures, none on the fatal ones. Scorers and the
        distill stage's rewriter share this one schedule."""
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        payload = json.dumps(self.body(row)).encode()
        last: Retryable | None = None
        for attempt in range(c.retries + 1):
            if attempt:
                self._count("retries")
                base = min(c.max_backoff_s, c.backoff_s * 2 ** (attempt - 1))
                wait = last.retry_after if last and last.retry_after is not None else base * random.uniform(0.5, 1)
                time.sleep(min(wait, c.max_backoff_s))
            try:
                return self._attempt(payload)
            except Retryable as e:
                self._count(f"failed_{e.reason}")
                last = e
            except Fatal as e:
                self._count(f"failed_{e.reason}")
                return Verdict.fail(e.reason, e.detail)
        assert last is not None
        return Verdict.fail(last.reason, f"{c.retries + 1} attempt(s); last: {last.detail}")

    def score_one(self, row: dict[str, Any]) -> Verdict:
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        if uses_field(c.prompt, "response") and not row_fields(row)["response"].strip():
            return Verdict.fail(NO_RESPONSE, "the prompt rates {response} and the row has no assistant turn")
        text = self.reply(row)
        if isinstance(text, Verdict):
            return text
        score = parse_score(text, self.rx)
        if score is None:
            return Verdict.fail(UNPARSABLE, f"reply: {text[:500]!r}")
        return Verdict(score)

    def score(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        if self._pool is None:
            raise RuntimeError("OpenAIScorer.score before open()")
        return list(self._pool.map(self.score_one, rows))
