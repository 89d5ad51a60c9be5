"""The `openai` scorer against a real server: r1v's tiny VLM behind `r1v serve` (Ray Serve, its own 2-CPU cluster)
on 127.0.0.1, started here. Faults come from a test-only proxy in front of it (`r1v_fault_proxy`: a
`[[fault:...]]` marker in the request makes the proxy answer 500, a truncated body, or wait before forwarding);
401 and 404 are the server's own. Each is handled as `r1v.judges.openai_client` documents. The scores are the
model's own: `guided_choice` (vLLM's extension, which `r1v serve` implements) picks the likeliest of "0".."5"."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from r1v_fault_proxy import FaultProxy
from r1v_test_servers import SERVE_KEY, r1v_serve
from score_corpora import read, row

from r1v.core.judges import SCORERS
from r1v.data.parts import TooManyQuarantined
from r1v.rounds.config import ScoreConfig
from r1v.rounds.scoring import score_corpus
from r1v.workflow import tracking

KEY_ENV = "R1V_TEST_JUDGE_KEY"
SCORES = [str(i) for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_assets):
    """`r1v serve` with the fault proxy in front; yields the proxy's base URL (…/v1)."""
    with r1v_serve(tiny_assets["model"], {
            "name": "judge", "engine": {"num_cpus": 1, "max_batch": 8}, "torch_threads": 1,
            "preprocess": {"max_tiles": 2, "max_length": 1024},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}}) as served:
        proxy = FaultProxy(f"http://127.0.0.1:{served['port']}")
        try:
            yield proxy.url + "/v1"
        finally:
            proxy.stop()


def _stats(url: str) -> dict[str, int]:
    return json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/_faults", timeout=10).read())


def _cfg(url: str, **kw: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": url, "model": "judge", "api_key_env": KEY_ENV, "prompt": "{question}",
            "extra_body": {"guided_choice": SCORES}, "retries": 2, "backoff_s": 0.01, "timeout_s": 60,
            "concurrency": 3, **kw}


@pytest.fixture(autouse=True)
def _key(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SERVE_KEY)


def test_scores_and_500_and_malformed_replies(server, tiny_assets, corpus_factory, tmp_path: Path) -> None:
    image = pq.read_table(tiny_assets["train"]).column("images")[0].as_py()[0]
    src = corpus_factory([
        row("ok", question="Is 3 + 4 = 7?"),
        row("image", question="What is the sum?", images=[image]),
        row("500_once", question="q [[fault:500-once]]"), row("garbage_once", question="q [[fault:garbage-once]]"),
        row("500", question="q [[fault:500]]"), row("garbage", question="q [[fault:garbage]]")])
    before = _stats(server)
    c = ScoreConfig(corpus=src, scorer=_cfg(server, images=True), max_quarantined_fraction=1.0)
    res = score_corpus(c, tmp_path / "st", tracking.RunLogger(None, None))
    scored = {r["id"]: r["rm_score"] for r in read(res["corpus"])}
    # A retried 500 and a retried malformed body end scored; the model's choice is one of the allowed scores.
    assert set(scored) == {"ok", "image", "500_once", "garbage_once"}
    assert all(str(int(s)) in SCORES and s == int(s) for s in scored.values())
    bad = {r["id"]: (r["reason"], r["detail"]) for r in read(res["quarantine"])}
    assert bad["500"][0] == "http_error" and "3 attempt(s)" in bad["500"][1] and "HTTP 500" in bad["500"][1]
    assert bad["garbage"][0] == "bad_reply" and "not a chat completion" in bad["garbage"][1]
    after = _stats(server)
    assert after["requests_500"] - before.get("requests_500", 0) == 3  # 1 + retries
    assert after["requests_garbage"] - before.get("requests_garbage", 0) == 3
    assert after["requests_500-once"] - before.get("requests_500-once", 0) == 2
    s = json.loads(Path(res["summary"]).read_text())
    assert s["rows_in"] == 6 and s["quarantine_reasons"] == {"bad_reply": 1, "http_error": 1}
    assert s["scorer_stats"]["judge_retries"] == 6  # 2 + 2 exhausted, 1 + 1 recovered


def test_timeouts_are_retried_then_quarantined(server) -> None:
    cfg = ScoreConfig(corpus="-", scorer=_cfg(server, timeout_s=1.0, retries=1, concurrency=2)).scorer
    rows = [row("slow", question="q [[fault:sleep=3]]"), row("slow_once", question="q [[fault:sleep-once=3]]")]
    with SCORERS.get("openai")(cfg, 0, 5) as scorer:
        slow, once = scorer.score(rows)
    assert slow.score is None and slow.reason == "timeout" and "2 attempt(s)" in slow.detail
    assert once.score is not None and 0 <= once.score <= 5


def test_unparsable_wrong_model_and_wrong_key_are_not_retried(server, monkeypatch) -> None:
    def run(**kw: Any):
        cfg = ScoreConfig(corpus="-", scorer=_cfg(server, **kw)).scorer
        with SCORERS.get("openai")(cfg, 0, 5) as scorer:
            return scorer.score([row("r")])[0], scorer.stats()

    # Free text from the tiny model holds no "Score: N": quarantined with the reply, never a default score.
    v, st = run(extra_body={}, max_tokens=6, score_pattern=r"Score: ([0-5])")
    assert v.reason == "unparsable_score" and v.detail.startswith("reply: ") and st["judge_requests"] == 1
    v, st = run(model="nope")
    assert v.reason == "http_error" and "HTTP 404" in v.detail and st["judge_requests"] == 1
    monkeypatch.setenv(KEY_ENV, "wrong-key-0123456789abcdef")
    v, st = run()
    assert v.reason == "http_error" and "HTTP 401" in v.detail and st["judge_requests"] == 1
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"api_key_env: environment variable '{KEY_ENV}' is not set"):
        run()


def test_a_dead_server_fails_the_stage(corpus_factory, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = corpus_factory([row("a"), row("b")])
    c = ScoreConfig(corpus=src, scorer=_cfg(f"http://127.0.0.1:{port}/v1", retries=1))
    with pytest.raises(TooManyQuarantined, match="2 of 2 rows quarantined"):
        score_corpus(c, tmp_path / "st", tracking.RunLogger(None, None))
    assert {r["reason"] for r in read(tmp_path / "st" / "quarantine.parquet")} == {"connection_error"}
