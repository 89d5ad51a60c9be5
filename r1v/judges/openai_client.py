"""The `openai` scorer: a judge or reward model behind any OpenAI-compatible chat endpoint (vLLM, Ray Serve,
`r1v.serve.openai_server`).

Each row becomes one chat request (the config's prompt template, optionally the row's images as data URLs);
the reply's text is parsed for a score. A remote misbehaves in three ways, each handled the same documented way:

- timeout (no reply within `timeout_s`), connection refused, HTTP 408/429/5xx, or a 200 whose body is not a chat
  completion (malformed JSON, no `choices[0].message.content`): retried up to `retries` times with exponential
  backoff and jitter (`Retry-After` honoured); when every attempt failed the row is quarantined as `timeout`,
  `connection_error`, `http_error` or `bad_reply`, with the last error as detail;
- another 4xx (a wrong model name, a bad key): not retried, quarantined as `http_error`;
- a well-formed reply with no score in it: quarantined as `unparsable_score` with the reply's start.

No row is ever given a default score. The stage fails when too many rows are quarantined (a server that is
down), so a systematic failure stops the run instead of emptying the corpus.
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

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
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout (connect and read)")
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
    try:
        return float(headers.get("Retry-After")) if headers and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None


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

    def open(self) -> None:
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        if c.api_key_env:
            self.key = os.environ.get(c.api_key_env)
            if not self.key:
                raise ValueError(f"scorer.api_key_env: environment variable {c.api_key_env!r} is not set")
        self._pool = ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="r1v-judge")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

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
        """One request; the reply's text, or Retryable / Fatal."""
        c: OpenAIScorerConfig = self.config  # type: ignore[assignment]
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        self._count("requests")
        try:
            with urllib.request.urlopen(req, timeout=c.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = f"HTTP {e.code}: {e.read()[:300].decode('utf-8', 'replace')}"
            if e.code in (408, 429) or e.code >= 500:
                raise Retryable(HTTP_ERROR, detail, _retry_after(e.headers)) from None
            raise Fatal(HTTP_ERROR, detail) from None
        except TimeoutError as e:
            raise Retryable(TIMEOUT, f"no reply within {c.timeout_s} s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise Retryable(TIMEOUT, f"no reply within {c.timeout_s} s ({e.reason})") from None
            raise Retryable(CONNECTION, f"{self.url}: {e.reason}") from None
        except (ConnectionError, OSError) as e:  # reset mid-read, remote closed without a reply
            raise Retryable(CONNECTION, f"{self.url}: {e}") from None
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
