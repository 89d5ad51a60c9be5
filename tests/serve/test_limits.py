"""The guards on their own (no model, no server): API keys, the start-up refusal, image URLs, batching of jobs,
and the CLI's refusals before anything starts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pydantic
import pytest
from serve_helpers import bomb_png, data_url, png

from r1v.cli.app import main
from r1v.cli.serve import load_config, resolve
from r1v.core.config import ConfigError
from r1v.generation.engines import Completion
from r1v.serve import limits
from r1v.serve.chat import Job, run_jobs
from r1v.serve.config import LimitsConfig, ServeConfig, is_loopback
from r1v.serve.limits import ServeError, StartupError

KEY = "k" * 24


def test_keys_come_from_an_env_var_or_a_private_file_only(tmp_path):
    with pytest.raises(pydantic.ValidationError):
        ServeConfig.model_validate({"api_key": KEY})  # there is no such setting
    assert limits.load_keys(ServeConfig(), {}) == []
    assert limits.load_keys(ServeConfig(), {"R1V_API_KEY": f"{KEY}, {KEY}2"}) == [KEY, KEY + "2"]
    with pytest.raises(StartupError, match="MY_KEYS"):
        limits.load_keys(ServeConfig(api_key_env="MY_KEYS"), {})
    f = tmp_path / "keys"
    f.write_text(f"# serving keys\n{KEY}\n")
    f.chmod(0o644)
    with pytest.raises(StartupError, match="chmod 600") as e:
        limits.load_keys(ServeConfig(api_key_file=str(f)), {})
    assert KEY not in str(e.value)
    f.chmod(0o600)
    assert limits.load_keys(ServeConfig(api_key_file=str(f)), {}) == [KEY]
    with pytest.raises(StartupError, match="shorter") as e:
        limits.load_keys(ServeConfig(), {"R1V_API_KEY": "short"})
    assert "short" not in str(e.value).split("shorter")[0]


def test_keys_are_compared_as_digests_in_constant_time(monkeypatch):
    digests = limits.key_digests([KEY, KEY + "2"])
    assert all(KEY.encode() not in d for d in digests)
    calls = []
    real = limits.hmac.compare_digest
    monkeypatch.setattr(limits.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert limits.authorized(digests, f"Bearer {KEY}".encode())
    assert len(calls) == 2  # every stored key compared, also after a match
    assert not limits.authorized(digests, b"Bearer nope")
    assert not limits.authorized(digests, None) and not limits.authorized(digests, KEY.encode())
    assert limits.authorized([], None)  # no keys configured: open (loopback only, see below)


def test_a_public_host_without_keys_is_refused_at_start():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    assert ServeConfig().host == "127.0.0.1"
    limits.check_startup(ServeConfig(), [])
    limits.check_startup(ServeConfig(host="0.0.0.0"), limits.key_digests([KEY]))
    with pytest.raises(StartupError, match="not a loopback"):
        limits.check_startup(ServeConfig(host="0.0.0.0"), [])


def test_the_cli_refuses_before_starting_anything(tiny_assets, capsys, monkeypatch):
    import ray

    monkeypatch.delenv("R1V_API_KEY", raising=False)
    # another test of this worker may have left Ray running: what counts is that these calls start nothing
    started: list = []

    def init(*args, **kwargs):
        started.append(kwargs)
        raise AssertionError("r1v serve started Ray before refusing")

    monkeypatch.setattr(ray, "init", init)
    assert main(["serve", tiny_assets["model"], "host=0.0.0.0"]) == 2
    assert "not a loopback" in capsys.readouterr().err
    assert main(["serve", tiny_assets["model"], "limits.max_n=0"]) == 2
    assert "limits.max_n" in capsys.readouterr().err
    for wrong in ("api_key=", "api_key_env=sk-", "server.key=sk-"):  # a key where it does not belong: not repeated
        assert main(["serve", tiny_assets["model"], wrong + KEY]) == 2
        err = capsys.readouterr().err
        assert "command line" in err and KEY not in err
    assert main(["serve", str(tiny_assets["root"] / "nothing")]) == 2
    assert started == []


def test_model_run_and_stage_arguments(tiny_assets, tmp_path):
    assert resolve(tiny_assets["model"]) == (str(os.path.realpath(tiny_assets["model"])), "vlm")
    stage = tmp_path / "run" / "stages" / "sft"
    stage.mkdir(parents=True)
    (stage / "state.json").write_text(json.dumps({"status": "done", "outputs": {"model": tiny_assets["model"]}}))
    assert resolve(str(stage)) == (str(os.path.realpath(tiny_assets["model"])), "sft")
    (stage / "state.json").write_text(json.dumps({"status": "failed", "outputs": {}}))
    with pytest.raises(ValueError, match="no finished model"):
        resolve(str(stage))
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("port: 9000\nlimits:\n  max_images: 1\n")
    cfg = load_config(str(cfg_file), ["limits.max_n=2"])
    assert (cfg.port, cfg.limits.max_images, cfg.limits.max_n, cfg.host) == (9000, 1, 2, "127.0.0.1")
    with pytest.raises(ConfigError, match="serve.yaml: limits.max_imagez"):
        cfg_file.write_text("limits:\n  max_imagez: 1\n")
        load_config(str(cfg_file), [])


def test_image_urls(monkeypatch):
    lim = LimitsConfig(max_image_pixels=1000 * 1000)
    fetched = []

    async def fetch(url, *_):
        fetched.append(url)
        return png()

    monkeypatch.setattr(limits, "fetch_image", fetch)

    def run(url, lim=lim):
        return asyncio.run(limits.image_bytes(url, lim, "img"))

    assert run(data_url(png())) == png()
    for url in ("http://127.0.0.1/a.png", "https://example.com/a.png", "file:///etc/passwd", "ftp://x/a.png",
                "/etc/passwd", "gopher://x"):
        with pytest.raises(ServeError) as e:
            run(url)
        assert e.value.code == "image_url_refused" and e.value.status == 400
    assert fetched == []  # no allow-list: nothing fetched, ever
    allow = LimitsConfig(allowed_image_hosts=["images.example.com"])
    assert run("https://images.example.com/a.png", allow) == png()
    for url in ("https://evil.example.com/a.png", "https://images.example.com@evil.com/a.png",
                "https://user:pw@images.example.com/a.png", "file://images.example.com/etc/passwd"):
        with pytest.raises(ServeError):
            run(url, allow)
    assert fetched == ["https://images.example.com/a.png"]
    with pytest.raises(ServeError, match="base64") as e:
        run("data:image/png;base64,!!!")
    with pytest.raises(ServeError) as e:
        run(data_url(bomb_png()))  # 10^10 pixels: over ours, and over PIL's own guard
    assert e.value.code == "image_too_large"


class _Engine:
    def __init__(self):
        self.calls = []

    def generate(self, requests, sampling, n, seed):
        self.calls.append(len(requests))
        if any(r.prompt_ids == [666] for r in requests):
            raise RuntimeError("bad prompt")
        return [[Completion([1], [], f"{r.prompt_ids[0]}", True)] * n for r in requests]


def test_jobs_share_engine_calls_and_fail_alone():
    def job(i, temperature=0.0, seed=None, max_new=4):
        prompt = {"input_ids": [i], "pixel_values": b"", "n_tiles": 0, "repetition_penalty": 1.0}
        return Job(prompt, {"temperature": temperature, "top_p": 1.0, "max_new_tokens": max_new}, 1, seed, 1e18)

    engine = _Engine()
    out = run_jobs(engine, [job(1), job(2), job(3)], batch=8)
    assert engine.calls == [3] and [o[0].text for o in out] == ["1", "2", "3"]
    engine = _Engine()
    out = run_jobs(engine, [job(1), job(666), job(3)], batch=8)
    assert isinstance(out[1], RuntimeError) and [out[0][0].text, out[2][0].text] == ["1", "3"]
    engine = _Engine()  # sampled with seeds: alone; without: together; other max_tokens: apart
    run_jobs(engine, [job(1, 1.0, 5), job(2, 1.0, 5), job(3, 1.0), job(4, 1.0), job(5, max_new=8)], batch=8)
    assert sorted(engine.calls) == [1, 1, 1, 2]
    expired = Job(job(1).prompt, job(1).sampling, 1, None, 0.0)
    assert isinstance(run_jobs(_Engine(), [expired], 8)[0], TimeoutError)


def test_jobs_carry_their_penalty_and_scope_into_a_shared_call():
    """Jobs differing only in repetition penalty or its scope share an engine call; each request keeps its own."""
    seen = []

    class Engine:
        def generate(self, requests, sampling, n, seed):
            seen.extend((r.repetition_penalty, r.repetition_penalty_scope) for r in requests)
            return [[Completion([1], [], "x", True)] * n for r in requests]

    def job(i, penalty, scope):
        prompt = {"input_ids": [i], "pixel_values": b"", "n_tiles": 0, "repetition_penalty": penalty,
                  "repetition_penalty_scope": scope}
        return Job(prompt, {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4, "repetition_penalty": penalty,
                            "repetition_penalty_scope": scope}, 1, None, 1e18)

    want = [(1.0, "prompt_and_generated"), (2.0, "generated"), (2.0, "prompt_and_generated")]
    run_jobs(Engine(), [job(i, *w) for i, w in enumerate(want)], batch=8)
    assert seen == want


def test_digest_is_sha256():
    assert limits.key_digests([KEY]) == [hashlib.sha256(KEY.encode()).digest()]
