"""Chat completions on r1v's generation service, independent of HTTP and of Ray Serve: an OpenAI request checked
against the limits, its messages and images turned into an engine prompt (`r1v.data.pipeline`, as every stage
encodes), jobs grouped into shared engine calls (`r1v.generation.service.generate_jobs`), and OpenAI's response
and stream-chunk bodies.

`ChatService` is what a replica holds: one engine (`r1v.generation.service.open_engine`, in the replica's
process) and the request path from raw headers and body to an answer. `r1v.serve.app` puts it behind FastAPI
inside a Ray Serve deployment, whose `serve.batch` gathers concurrent requests into `run_jobs` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1v.data.pipeline import RowError, load_tokenizer, preprocess_row
from r1v.data.prompt import encode_prompt
from r1v.generation.engines import Completion, Request, is_vlm_dir
from r1v.generation.service import generate_jobs, open_engine
from r1v.model.tokens import IMAGE_MARKER, IMG_CONTEXT, IMG_END, IMG_START
from r1v.serve.config import ServeConfig
from r1v.serve.limits import INTERNAL, ServeError, check_length, image_bytes, read_capped, require_key

log = logging.getLogger("r1v.serve")

RESERVED_TEXT = (IMAGE_MARKER, IMG_CONTEXT, IMG_START, IMG_END)
"""Strings a message's text may not hold: they would become image slots (images come only as image_url parts)."""
MAX_CHOICES = 64
"""The most strings a `guided_choice` may offer (each is scored in one forward pass with the others)."""
MAX_CHOICE_CHARS = 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The parameters of `POST /v1/chat/completions` this server implements; any other is refused (400) rather
    than silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**62)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text is cut before the first")
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM's extension (prompt tokens count too, "
                                      "unless repetition_penalty_scope is generated)")
    repetition_penalty_scope: Literal["prompt_and_generated", "generated"] = Field(
        "prompt_and_generated", description="r1v's extension: the tokens repetition_penalty counts, the prompt's "
        "and the completion's (vLLM's and transformers' own) or the completion's only")
    user: str | None = None
    # Accepted only at the values that mean "off", so that clients sending their defaults still work.
    frequency_penalty: Literal[0, 0.0] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES,
                                            description="vLLM's extension: the answer is one of these strings")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def validation_error(e: ValidationError) -> ServeError:
    """The first problem of a request body as an OpenAI-style 400 naming the parameter."""
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return ServeError(400, f"unsupported parameter: {param!r}", param=param, code="unsupported_parameter")
    if err["type"] == "literal_error" and param in ("frequency_penalty", "presence_penalty", "logprobs"):
        return ServeError(400, f"{param} is not supported (only its default)", param=param,
                          code="unsupported_parameter")
    return ServeError(400, f"{param}: {err['msg']}", param=param, code="invalid_value")


def context_length(model_dir: str | Path, cfg: ServeConfig) -> int:
    """The model's context in tokens: its (text) config's max_position_embeddings; vLLM's max_model_len when set."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    text = c.get("text_config") or c.get("llm_config") or c
    n = int(text.get("max_position_embeddings") or c.get("max_position_embeddings") or 2048)
    if cfg.engine.kind == "vllm" and cfg.engine.vllm.max_model_len:
        n = min(n, cfg.engine.vllm.max_model_len)
    return n


@dataclass
class Job:
    """One request's generation: its prompt (engine inputs), sampling, n, seed and deadline."""

    prompt: dict[str, Any]
    sampling: dict[str, Any]
    n: int
    seed: int | None
    deadline: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    choices: list[tuple[str, list[int]]] | None = None
    """guided_choice: (text, token ids) of each allowed answer; the job's answer is the likeliest."""

    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys share engine calls. Greedy ones share freely; sampled ones with a seed run alone
        (their samples then depend on the seed only, not on the batch they came in); sampled ones without a seed
        share one random seed."""
        s = self.sampling
        if self.choices is not None:  # one forward pass of its own
            return ("choice", self.id)
        base = (s["temperature"], s["top_p"], s["max_new_tokens"], self.n)
        if s["temperature"] == 0:
            return (*base, "greedy")
        return (*base, ("seeded", self.id) if self.seed is not None else "any")


def run_jobs(engine: Any, jobs: list[Job], batch: int) -> list[list[Completion] | BaseException]:
    """Completions (n per job) or the error of each job, in order. Jobs are grouped by `Job.key` and each group
    generated by the generation service (`generate_jobs`, `batch` sequences per engine call). A group whose call
    fails is retried one job at a time, so one bad request fails alone. Jobs past their deadline are not run."""
    out: list[list[Completion] | BaseException | None] = [None] * len(jobs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    now = time.monotonic()
    for i, j in enumerate(jobs):
        if j.deadline <= now:
            out[i] = TimeoutError("deadline passed while waiting for a batch")
        else:
            groups.setdefault(j.key(), []).append(i)

    def call(idx: list[int]) -> list[list[Completion]]:
        first = jobs[idx[0]]
        if first.choices is not None:
            return [choose(engine, first)]
        seed = first.seed if first.seed is not None else random.randrange(2**31)
        prompts = [jobs[i].prompt for i in idx]
        return generate_jobs(engine, prompts, [(first.sampling, first.n)], seed, batch, desc="serve",
                             penalty_key="repetition_penalty", scope_key="repetition_penalty_scope")[0]

    for idx in groups.values():
        try:
            for i, comps in zip(idx, call(idx), strict=True):
                out[i] = comps
        except Exception as e:  # noqa: BLE001  (one request's failure must not fail the others)
            if len(idx) == 1:
                out[idx[0]] = e
                continue
            for i in idx:
                try:
                    out[i] = call([i])[0]
                except Exception as e1:  # noqa: BLE001
                    out[i] = e1
    return out  # type: ignore[return-value]


def choose(engine: Any, job: Job) -> list[Completion]:
    """A guided-choice job's answer, n times: the choice whose tokens are likeliest after the prompt (the sum of
    their log-probabilities, `continuation_logprobs`)."""
    p, choices = job.prompt, job.choices or []
    request = Request(p["input_ids"], p["pixel_values"], p["n_tiles"])
    scores = engine.continuation_logprobs(request, [ids for _, ids in choices])
    text, ids = choices[max(range(len(choices)), key=scores.__getitem__)]
    return [Completion(token_ids=list(ids), logprobs=[], text=text, finished=True) for _ in range(job.n)]


def _text_parts(i: int, m: dict[str, Any]) -> list[tuple[str, Any]]:
    """A message's content as [("text", str) | ("image", url)]."""
    content = m.get("content")
    if isinstance(content, str):
        return [("text", content)]
    if content is None and m.get("role") == "assistant":
        return [("text", "")]
    if not isinstance(content, list):
        raise ServeError(400, f"messages[{i}].content must be a string or a list of parts",
                         param=f"messages[{i}].content")
    parts = []
    for j, p in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append(("text", p["text"]))
        elif kind == "image_url" and m.get("role") == "user":
            ref = p.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if isinstance(ref, dict) and set(ref) - {"url", "detail"}:
                raise ServeError(400, f"{where}.image_url: unsupported fields {sorted(set(ref) - {'url', 'detail'})}",
                                 param=f"{where}.image_url", code="unsupported_parameter")
            parts.append(("image", url))
        elif kind == "image_url":
            raise ServeError(400, f"{where}: images are accepted in user messages only", param=where)
        else:
            raise ServeError(400, f"{where}: unsupported content part type {kind!r} (text and image_url are)",
                             param=where, code="unsupported_parameter")
    return parts


def message_parts(messages: list[dict[str, Any]], cfg: ServeConfig) -> list[tuple[str, list[tuple[str, Any]]]]:
    """(role, parts) per message, checked: roles, fields, the message and image counts, reserved strings."""
    lim = cfg.limits
    if len(messages) > lim.max_messages:
        raise ServeError(400, f"{len(messages)} messages, over the limit of {lim.max_messages} (limits.max_messages)",
                         param="messages", code="too_many_messages")
    out = []
    images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ServeError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ServeError(400, f"messages[{i}].role {m.get('role')!r} is not supported (system, developer, user, "
                             "assistant are)", param=f"messages[{i}].role", code="unsupported_parameter")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ServeError(400, f"messages[{i}]: unsupported fields {sorted(extra)}", param=f"messages[{i}]",
                             code="unsupported_parameter")
        parts = _text_parts(i, m)
        for kind, value in parts:
            if kind == "text" and any(r in value for r in RESERVED_TEXT):
                raise ServeError(400, f"messages[{i}]: the text holds a reserved image token (one of "
                                 f"{', '.join(RESERVED_TEXT)}); send images as image_url parts",
                                 param=f"messages[{i}].content")
        images += sum(kind == "image" for kind, _ in parts)
        out.append((role, parts))
    if images > lim.max_images:
        raise ServeError(400, f"{images} images, over the limit of {lim.max_images} per request (limits.max_images)",
                         param="messages", code="too_many_images")
    return out


@dataclass
class Prepared:
    """A checked request: the job to run and what the answer needs."""

    req: ChatRequest
    job: Job
    prompt_tokens: int
    stops: list[str]


class ChatService:
    """One model behind the chat API. `submit(job)` runs a job (default: alone, in a worker thread; a Serve replica
    replaces it with its `serve.batch` method)."""

    def __init__(self, cfg: ServeConfig, model_dir: str, name: str, digests: list[bytes],
                 engine: Any | None = None) -> None:
        self.cfg, self.model_dir, self.name, self.digests = cfg, str(model_dir), name, list(digests)
        self.context = context_length(model_dir, cfg)
        self.vision = is_vlm_dir(self.model_dir)
        self.tok = load_tokenizer(self.model_dir)
        self._stack = contextlib.ExitStack()
        if engine is None:  # the generation service's engine in this process (the replica's), on its threads
            engine, _ = self._stack.enter_context(open_engine(self.model_dir, _EngineSpec(cfg), actors=False))
        self.engine = engine
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="r1v-engine")  # one engine call at a time
        self.submit: Callable[[Job], Awaitable[list[Completion]]] = self._run_alone
        self.stats = {"requests": 0, "batches": 0, "batched_requests": 0, "largest_batch": 0, "errors": 0}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stack.close()

    async def _run_alone(self, job: Job) -> list[Completion]:
        res = (await self.run_batch([job]))[0]
        if isinstance(res, BaseException):
            raise res
        return res

    async def run_batch(self, jobs: list[Job]) -> list[list[Completion] | BaseException]:
        """Run jobs together in the engine thread (the event loop keeps answering meanwhile)."""
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, run_jobs, self.engine, jobs, self.cfg.engine.max_batch)

    # ------------------------------------------------------------------------------------------ the request

    def _parse(self, body: bytes) -> ChatRequest:
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise ServeError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ServeError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != self.name:
            raise ServeError(404, f"the model {req.model!r} does not exist (this server serves {self.name!r})",
                             param="model", code="model_not_found")
        return req

    def _max_tokens(self, req: ChatRequest) -> tuple[int, bool]:
        """(max_tokens, whether the client asked for it), checked against the limits."""
        lim = self.cfg.limits
        cap = min(lim.max_tokens or self.context, self.context)
        asked = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if req.n > lim.max_n:
            raise ServeError(400, f"n {req.n} is over the limit of {lim.max_n} (limits.max_n)", param="n",
                             code="too_many_choices")
        if asked is None:
            return max(1, min(lim.default_max_tokens, cap, lim.max_total_tokens // req.n)), False
        if asked > cap:
            raise ServeError(400, f"{param} {asked} is over the limit of {cap} (the model's context is {self.context} "
                             "tokens; limits.max_tokens)", param=param, code="max_tokens_too_large")
        if asked * req.n > lim.max_total_tokens:
            raise ServeError(400, f"n x {param} = {req.n} x {asked} is over the limit of {lim.max_total_tokens} "
                             "tokens per request (limits.max_total_tokens)", param=param,
                             code="max_tokens_too_large")
        return asked, True

    def _stops(self, req: ChatRequest) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ServeError(400, "stop: up to 4 non-empty strings of at most 256 characters", param="stop")
        return stops

    def encode(self, turns: list[dict[str, str]], images: list[bytes]) -> dict[str, Any]:
        """Engine inputs of a conversation, encoded as the data pipeline encodes every prompt."""
        pre = self.cfg.preprocess
        try:
            if self.vision:
                enc = preprocess_row({"messages": turns, "images": images}, self.model_dir, pre, with_labels=False)
                return {"input_ids": enc["input_ids"], "pixel_values": enc["pixel_values"], "n_tiles": enc["n_tiles"]}
            if images:
                raise ServeError(400, f"the model {self.name!r} is text-only: remove the image parts", param="messages")
            ids = encode_prompt(turns, self.tok, [], 1, system=pre.system_prompt)
        except RowError as e:
            code = "context_length_exceeded" if e.reason == "too_long" else "invalid_image" \
                if e.reason == "image_decode" else "invalid_messages"
            what = "an image could not be decoded" if e.reason == "image_decode" else e.detail
            raise ServeError(400, f"{what}", param="messages", code=code) from None
        except ValueError as e:
            raise ServeError(400, str(e)[:300], param="messages", code="invalid_messages") from None
        if len(ids) > pre.max_length:
            raise ServeError(400, f"prompt has {len(ids)} tokens, over preprocess.max_length {pre.max_length}",
                             param="messages", code="context_length_exceeded")
        return {"input_ids": ids, "pixel_values": b"", "n_tiles": 0}

    async def prepare(self, body: bytes, deadline: float) -> Prepared:
        req = self._parse(body)
        max_tokens, asked = self._max_tokens(req)
        stops = self._stops(req)
        turns, images = [], []
        for role, parts in message_parts(req.messages, self.cfg):
            texts = []
            for kind, value in parts:
                if kind == "image":
                    where = f"messages[{len(turns)}].image[{len(images)}]"
                    images.append(await image_bytes(value, self.cfg.limits, where))
                    texts.append(IMAGE_MARKER)
                else:
                    texts.append(value)
            turns.append({"role": role, "content": "\n".join(texts)})
        prompt = await asyncio.to_thread(self.encode, turns, images)
        n_prompt = len(prompt["input_ids"])
        room = self.context - n_prompt
        if max_tokens > room:
            if asked or room < 1:
                raise ServeError(400, f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) exceed the "
                                 f"model's context of {self.context} tokens", param="messages",
                                 code="context_length_exceeded")
            max_tokens = room
        prompt["repetition_penalty"] = req.repetition_penalty
        prompt["repetition_penalty_scope"] = req.repetition_penalty_scope
        sampling = {"temperature": req.temperature, "top_p": req.top_p if req.temperature > 0 else 1.0,
                    "max_new_tokens": max_tokens, "repetition_penalty": req.repetition_penalty,
                    "repetition_penalty_scope": req.repetition_penalty_scope}
        choices = self._choices(req, max_tokens, room) if req.guided_choice is not None else None
        return Prepared(req, Job(prompt, sampling, req.n, req.seed, deadline, choices=choices), n_prompt, stops)

    def _choices(self, req: ChatRequest, max_tokens: int, room: int) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each guided choice, checked: answered greedily (temperature 0, no repetition
        penalty), each choice non-empty and within max_tokens and the context; engines that score continuations
        only (the transformers engine)."""
        if not hasattr(self.engine, "continuation_logprobs"):
            raise ServeError(400, f"guided_choice is not served by the {self.cfg.engine.kind!r} engine (the "
                             "transformers engine serves it)", param="guided_choice", code="unsupported_parameter")
        if req.temperature != 0 or req.repetition_penalty != 1.0:
            raise ServeError(400, "guided_choice answers the likeliest choice: send temperature 0 and no "
                             "repetition_penalty", param="guided_choice", code="invalid_value")
        out = []
        for i, text in enumerate(req.guided_choice or []):
            ids = self.tok(text, add_special_tokens=False)["input_ids"] if text else []
            if not ids or len(text) > MAX_CHOICE_CHARS:
                raise ServeError(400, f"guided_choice[{i}] must be a non-empty string of at most {MAX_CHOICE_CHARS} "
                                 "characters", param=f"guided_choice[{i}]", code="invalid_value")
            if len(ids) > min(max_tokens, room):
                raise ServeError(400, f"guided_choice[{i}] is {len(ids)} tokens, over max_tokens ({max_tokens}) or "
                                 "what the context leaves", param=f"guided_choice[{i}]", code="invalid_value")
            out.append((text, ids))
        return out

    async def chat(self, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
                   ) -> tuple[int, dict[str, Any] | AsyncIterator[bytes]]:
        """Status and answer (a JSON body, or SSE bytes for `stream`) of one `POST /v1/chat/completions`: the key
        first (before any of the body is read), then the body under its size cap and deadline, then the rest."""
        lim = self.cfg.limits
        self.stats["requests"] += 1
        try:
            require_key(self.digests, headers)
            check_length(headers, lim.max_body_bytes)
            raw = await read_capped(body, lim.max_body_bytes, lim.body_timeout_s)
            deadline = time.monotonic() + lim.request_timeout_s
            p = await self.prepare(raw, deadline)
            left = deadline - time.monotonic()
            try:
                comps = await asyncio.wait_for(self.submit(p.job), max(0.0, left))
            except TimeoutError:
                raise ServeError(504, f"the request did not complete within {lim.request_timeout_s:g} s "
                                 "(limits.request_timeout_s)", code="timeout") from None
            choices = finish(comps, p.stops)
            if p.req.stream:
                return 200, sse(self.name, choices, p.prompt_tokens, bool(p.req.stream_options and
                                                                          p.req.stream_options.include_usage))
            return 200, completion(self.name, choices, p.prompt_tokens)
        except ServeError as e:
            self.stats["errors"] += 1
            return e.status, e.body()
        except Exception:  # noqa: BLE001  (a 500 that says nothing of the internals; the log has them)
            self.stats["errors"] += 1
            ref = uuid.uuid4().hex[:12]
            log.exception("request %s failed", ref)
            return 500, ServeError(500, f"{INTERNAL} (reference {ref})").body()

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "r1v",
                                            "max_model_len": self.context}]}


class _EngineSpec:
    """What `r1v.generation.service` reads of a config (`EngineSpec`)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.engine = cfg.engine
        self.torch_threads = cfg.threads()


# ------------------------------------------------------------------------------------------------ answers


def finish(comps: list[Completion], stops: list[str]) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) per choice; text cut before the first stop string."""
    out = []
    for c in comps:
        text, reason = c.text, "stop" if c.finished else "length"
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        out.append((text, reason, len(c.token_ids)))
    return out


def _usage(choices: Iterable[tuple[str, str, int]], prompt_tokens: int) -> dict[str, int]:
    used = sum(k for _, _, k in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}


def completion(name: str, choices: list[tuple[str, str, int]], prompt_tokens: int) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": reason, "logprobs": None}
                        for i, (text, reason, _) in enumerate(choices)],
            "usage": _usage(choices, prompt_tokens)}


async def sse(name: str, choices: list[tuple[str, str, int]], prompt_tokens: int, usage: bool
              ) -> AsyncIterator[bytes]:
    """The answer as server-sent `chat.completion.chunk` events (role, content, finish per choice), `[DONE]` last.
    The engines generate whole completions, so the chunks come once a completion is done."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(chunk_choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": None, "choices": chunk_choices, **extra}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    for i, (text, reason, _) in enumerate(choices):
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None}])
        if text:
            yield event([{"index": i, "delta": {"content": text}, "finish_reason": None, "logprobs": None}])
        yield event([{"index": i, "delta": {}, "finish_reason": reason, "logprobs": None}])
    if usage:
        yield event([], usage=_usage(choices, prompt_tokens))
    yield b"data: [DONE]\n\n"
