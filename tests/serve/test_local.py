"""The chat API in this process, without Ray: r1v's front in front of the FastAPI routes around one ChatService (the
real tiny engine), each on a uvicorn server in a thread. Each limit and refusal is checked at the socket or through
the official `openai` client; `test_ray_serve.py` runs the same routes as a Ray Serve application."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time

import openai
import pytest
from serve_helpers import (
    KEY,
    ThreadServer,
    bomb_png,
    choice_logprobs,
    data_url,
    expected_greedy,
    image_message,
    plain_server,
    png,
    post_head,
    raw_request,
)

from r1v.serve.app import local_app
from r1v.serve.chat import ChatService
from r1v.serve.config import ServeConfig
from r1v.serve.front import Front, server
from r1v.serve.limits import key_digests

MAX_BODY = 256 * 1024


class _Images(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        payload = png(40, 40, (0, 0, 200))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _image_server(handler_name: str):
    handler = type(handler_name, (_Images,), {"hits": 0})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler


def serve_config(**limits) -> ServeConfig:
    return ServeConfig.model_validate({
        "name": "tiny", "engine": {"num_cpus": 1, "max_batch": 8}, "torch_threads": 1,
        "preprocess": {"max_tiles": 2, "max_length": 1024},
        "limits": {"max_body_bytes": MAX_BODY, "max_messages": 4, "max_images": 2, "max_image_pixels": 1000 * 1000,
                   "max_n": 3, "max_total_tokens": 64, "default_max_tokens": 8, "body_timeout_s": 8,
                   "header_timeout_s": 2, "request_timeout_s": 120, **limits}})


@pytest.fixture(scope="module")
def stack(tiny_assets):
    allowed, allowed_h = _image_server("Allowed")
    other, other_h = _image_server("Other")
    cfg = serve_config(allowed_image_hosts=[f"127.0.0.1:{allowed.server_address[1]}"])
    digests = key_digests([KEY])
    service = ChatService(cfg, tiny_assets["model"], "tiny", digests)
    backend = ThreadServer(plain_server(local_app(service)))
    front = ThreadServer(server(Front(backend.url, cfg, digests), cfg))
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"cfg": cfg, "service": service, "front": front, "backend": backend, "client": client,
           "allowed": (allowed, allowed_h), "other": (other, other_h), "model": tiny_assets["model"]}
    front.stop()
    backend.stop()
    service.close()
    allowed.shutdown()
    other.shutdown()


def error_of(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


def test_models_health_and_the_image_chat_equal_the_engine(stack, tiny_png):
    client = stack["client"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body, _ = raw_request(stack["front"].port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    messages = image_message(data_url(tiny_png))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    want = expected_greedy(stack["model"], tiny_png, "What is shown?", 12)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens > 0 and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_repetition_penalty_and_its_scope_reach_the_engine(stack, tiny_png):
    """`repetition_penalty` with r1v's `repetition_penalty_scope` extension: the chat answers what the engine
    gives with that penalty and scope (the prompt holds what the tiny model answers first, so the scopes part at
    once); an unknown scope is a 400 naming the parameter."""
    text = "Say 19aser again."
    client, messages = stack["client"], image_message(data_url(tiny_png), text)
    got = {}
    for scope in ("prompt_and_generated", "generated"):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"repetition_penalty": 2.0, "repetition_penalty_scope": scope})
        got[scope] = r.choices[0].message.content
        assert got[scope] == expected_greedy(stack["model"], tiny_png, text, 12, repetition_penalty=2.0,
                                             repetition_penalty_scope=scope)
    assert got["generated"] != got["prompt_and_generated"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                       extra_body={"repetition_penalty_scope": "prompt"})
    assert error_of(e.value)["param"] == "repetition_penalty_scope"


def test_guided_choice_answers_the_likeliest_choice(stack, tiny_png):
    """vLLM's `guided_choice` (what the `openai` judge sends): the choice whose tokens the model finds likeliest."""
    client, messages = stack["client"], image_message(data_url(tiny_png), "Score it.")
    choices = ["0", "1", "2", "3", "4", "5", "ten"]
    lp = choice_logprobs(stack["model"], tiny_png, "Score it.", choices)
    want = choices[max(range(len(choices)), key=lp.__getitem__)]
    assert len(set(lp)) == len(lp)  # no tie: the pick is well defined
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, n=2,
                                       extra_body={"guided_choice": choices})
    assert [c.message.content for c in r.choices] == [want, want] and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True,
                                            extra_body={"guided_choice": choices})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    for bad, param in (({"temperature": 0.7}, "guided_choice"), ({"guided_choice": ["1", ""]}, "guided_choice[1]"),
                       ({"guided_choice": []}, "guided_choice"), ({"max_tokens": 1}, "guided_choice[6]"),
                       ({"guided_choice": "123"}, "guided_choice")):
        kw = {"temperature": 0, "guided_choice": choices, **bad}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, temperature=kw.pop("temperature"),
                                           extra_body=kw)
        assert error_of(e.value)["param"] == param, (bad, error_of(e.value))


def test_api_key_required_and_checked(stack):
    for key in ("wrong-key-0123456789abcdef", ""):
        bad = openai.OpenAI(base_url=stack["front"].url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert error_of(e.value)["type"] == "authentication_error"
    status, _, _ = raw_request(stack["front"].port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert status == 401
    # the replica's own check, when its route is reached directly (not through the front)
    status, _, _ = raw_request(stack["backend"].port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert status == 401


def test_authentication_comes_before_the_body(stack):
    """No key, a body declared but never sent: 401 at once (reading the body first would wait for it, then 408)."""
    status, body, took = raw_request(stack["front"].port, post_head(length=100_000, key=None))
    assert status == 401 and took < 7, (status, took)  # waiting for the body would take body_timeout_s, 8 s
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_content_length_over_the_limit_is_refused_before_the_body(stack):
    status, body, took = raw_request(stack["front"].port, post_head(length=10 * MAX_BODY))
    assert status == 413 and took < 7, (status, took)
    assert "max_body_bytes" in json.loads(body)["error"]["message"]


def test_a_body_without_length_is_cut_at_the_limit(stack):
    """A chunked body that never ends: 413 once the limit passes, while the client is still sending (the server
    reads no further; socket buffers aside)."""
    total = 64 * 2**20
    sent = [0]
    answer: list[bytes] = []
    with socket.create_connection(("127.0.0.1", stack["front"].port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.sendall(post_head(extra=b"Transfer-Encoding: chunked") + b"\r\n\r\n")

        def read():
            answer.append(s.recv(65536))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
        try:
            while sent[0] < total and not answer:
                s.sendall(chunk)
                sent[0] += 65536
        except OSError:
            pass  # the server closed the connection
        reader.join(timeout=30)
    assert answer and answer[0].startswith(b"HTTP/1.1 413"), answer[:1]
    assert sent[0] < total / 4, f"the server read {sent[0]} bytes before refusing"


def test_a_body_that_does_not_arrive_in_time(stack):
    status, body, took = raw_request(stack["front"].port, post_head(length=100), body=b'{"model": ')
    assert status == 408 and 7.5 < took < 30, (status, took)


def test_a_slow_request_head_is_cut_off(stack):
    with socket.create_connection(("127.0.0.1", stack["front"].port), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(15)
        assert s.recv(1024) == b""  # closed, no answer (a connection kept open raises socket.timeout at 15 s)
        assert time.monotonic() - t0 < 14


@pytest.mark.parametrize("case", ["images", "pixels", "max_tokens", "n_x_max_tokens", "n", "messages"])
def test_request_limits(stack, tiny_png, monkeypatch, case):
    from PIL import Image

    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(self.size) or (_ for _ in ()).throw(
        AssertionError("decoded")))
    url = data_url(tiny_png)
    kwargs = {"model": "tiny", "messages": image_message(url), "max_tokens": 4}
    if case == "images":
        kwargs["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3}]
        want = "too_many_images"
    elif case == "pixels":
        kwargs["messages"] = image_message(data_url(bomb_png(2000, 2000)))
        want = "image_too_large"
    elif case == "max_tokens":
        kwargs["max_tokens"] = 4096  # the tiny model's context is 2048
        want = "max_tokens_too_large"
    elif case == "n_x_max_tokens":
        kwargs.update(n=3, max_tokens=30)  # 90 > limits.max_total_tokens 64
        want = "max_tokens_too_large"
    elif case == "n":
        kwargs["n"] = 4
        want = "too_many_choices"
    else:
        kwargs["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}] * 3
        want = "too_many_messages"
    with pytest.raises(openai.BadRequestError) as e:
        stack["client"].chat.completions.create(**kwargs)
    err = error_of(e.value)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == want, err
    assert not decoded  # nothing was decoded: refused before


def test_remote_and_file_image_urls(stack):
    client = stack["client"]
    (allowed, allowed_h), (other, other_h) = stack["allowed"], stack["other"]
    for url in (f"http://127.0.0.1:{other.server_address[1]}/a.png", "file:///etc/passwd",
                f"http://localhost:{allowed.server_address[1]}/a.png"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=image_message(url), max_tokens=2)
        assert error_of(e.value)["code"] == "image_url_refused"
    assert other_h.hits == 0 and allowed_h.hits == 0
    r = client.chat.completions.create(model="tiny", max_tokens=2, temperature=0,
                                       messages=image_message(f"http://127.0.0.1:{allowed.server_address[1]}/a.png"))
    assert r.choices[0].message.content is not None and allowed_h.hits == 1


def _post(port: int, body: bytes) -> tuple[int, dict]:
    status, raw, _ = raw_request(port, post_head(length=len(body), extra=b"Connection: close"), body)
    return status, json.loads(raw)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(stack, tiny_png):
    port = stack["front"].port
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    png_bytes = bytearray(tiny_png)
    png_bytes[60:120] = b"\x00" * 60  # header intact, image data broken
    cases = {
        "invalid_json": b'{"model": "tiny", "messages": [',
        "not_an_object": b"[1, 2]",
        "invalid_base64": json.dumps({**good, "messages": image_message("data:image/png;base64,@@@not-base64")}),
        "invalid_image": json.dumps({**good, "messages": image_message(data_url(bytes(png_bytes)))}),
        "not_an_image": json.dumps({**good, "messages": image_message(data_url(b"GIF89a-but-not-really"))}),
        "model_not_found": json.dumps({**good, "model": "gpt-5"}),
        "unsupported_parameter": json.dumps({**good, "tools": []}),
        "unsupported_logprobs": json.dumps({**good, "logprobs": True}),
        "reserved_text": json.dumps({**good, "messages": [{"role": "user", "content": "<IMG_CONTEXT> hi"}]}),
        "tool_role": json.dumps({**good, "messages": [{"role": "tool", "content": "x"}]}),
        "bad_type": json.dumps({**good, "temperature": "hot"}),
        "nan": json.dumps({**good, "temperature": float("nan")}),
        "huge_seed": json.dumps({**good, "seed": 2**80, "temperature": 1.0}),
        "deep_json": b"[" * 100_000 + b"]" * 100_000,
        "not_utf8": b'{"model": "\xff\xfe"}',
    }
    for name, body in cases.items():
        status, err = _post(port, body if isinstance(body, bytes) else body.encode())
        want = 404 if name == "model_not_found" else 400
        assert status == want, (name, status, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, (name, err)
        assert "Traceback" not in err["error"]["message"]
    status, ok = _post(port, json.dumps(good).encode())
    assert status == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def test_unknown_routes_and_methods(stack):
    for head, want in ((b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " +
                        KEY.encode(), 404),
                       (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                        + KEY.encode(), 405)):
        status, body, _ = raw_request(stack["front"].port, head)
        assert status == want and json.loads(body)["error"]["message"]


class _Engine:
    """A fake engine: sleeps, or fails with a message that must not reach the client."""

    def __init__(self, sleep: float = 0.0, fail: bool = False) -> None:
        self.sleep, self.fail = sleep, fail

    def generate(self, requests, sampling, n, seed):
        from r1v.generation.engines import Completion

        time.sleep(self.sleep)
        if self.fail:
            raise RuntimeError("/secret/path/model.safetensors: CUDA out of memory at 0xdeadbeef")
        return [[Completion([1, 2], [], "ok", True)] * n for _ in requests]


async def _body(data: bytes):
    yield data


def _chat(service: ChatService, body: dict) -> tuple[int, dict]:
    headers = [(b"authorization", f"Bearer {KEY}".encode())]
    return asyncio.run(service.chat(headers, _body(json.dumps(body).encode())))


def test_deadline_and_internal_errors(tiny_assets):
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    slow = ChatService(serve_config(request_timeout_s=1), tiny_assets["model"], "tiny", key_digests([KEY]),
                       engine=_Engine(sleep=60))
    t0 = time.monotonic()
    status, body = _chat(slow, good)
    assert status == 504 and time.monotonic() - t0 < 30 and body["error"]["type"] == "timeout_error"
    broken = ChatService(serve_config(), tiny_assets["model"], "tiny", key_digests([KEY]), engine=_Engine(fail=True))
    status, body = _chat(broken, good)
    text = json.dumps(body)
    assert status == 500 and body["error"]["type"] == "server_error"
    for leak in ("secret", "CUDA", "deadbeef", "RuntimeError", "Traceback"):
        assert leak not in text
    ok = ChatService(serve_config(), tiny_assets["model"], "tiny", key_digests([KEY]), engine=_Engine())
    assert _chat(ok, good)[0] == 200


def test_a_projector_only_stage_model_is_served_without_export(tiny_assets, tmp_path, tiny_png):
    from r1v.cli.serve import resolve
    from r1v.model.manifest import is_manifest_dir, projector_tensors, write_projector_model

    projector = {k: t * 1.5 for k, t in projector_tensors(tiny_assets["model"]).items()}
    stage = tmp_path / "run" / "stages" / "sft"
    manifest = write_projector_model(stage / "model", tiny_assets["model"], projector)
    (stage / "state.json").write_text(json.dumps({"status": "done", "outputs": {"model": str(manifest)}}))
    model_dir, name = resolve(str(stage))
    assert is_manifest_dir(model_dir) and name == "sft"
    service = ChatService(serve_config(), model_dir, name, key_digests([KEY]))
    try:
        status, body = _chat(service, {"model": "sft", "messages": image_message(data_url(tiny_png)),
                                       "max_tokens": 8, "temperature": 0})
    finally:
        service.close()
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected_greedy(model_dir, tiny_png, "What is shown?", 8)


def test_replicas_autoscaling_and_resources_from_the_config():
    from r1v.serve.app import deployment_options

    cfg = serve_config()
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"]["num_cpus"] == 1 and opts["max_ongoing_requests"] == 64
    cfg = ServeConfig.model_validate({"engine": {"num_cpus": 0.5, "num_gpus": 1, "kind": "vllm"},
                                      "replicas": {"autoscaling": True, "min_replicas": 0, "max_replicas": 4,
                                                   "target_ongoing_requests": 3}})
    opts = deployment_options(cfg)
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 3}
    assert "num_replicas" not in opts and opts["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ValueError, match="num_engines"):
        ServeConfig.model_validate({"engine": {"num_engines": 2}})


def test_the_rayservice_builder_needs_a_model_and_a_key(tiny_assets, monkeypatch):
    from r1v.serve.app import build
    from r1v.serve.limits import StartupError

    monkeypatch.delenv("R1V_API_KEY", raising=False)
    with pytest.raises(StartupError, match="args.model"):
        build({})
    with pytest.raises(StartupError, match="no API key"):
        build({"model": tiny_assets["model"]})
    monkeypatch.setenv("R1V_API_KEY", KEY)
    app = build({"model": tiny_assets["model"], "name": "tiny", "replicas": {"num_replicas": 2}})
    assert type(app).__name__ == "Application"
