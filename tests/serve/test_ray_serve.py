"""`r1v serve` for real: the CLI in a subprocess starts its own local Ray (2 CPUs), the Ray Serve application and
the front; the official `openai` client talks to it. Greedy answers equal the engine run directly; concurrent
requests share engine calls; a flood of bad requests does not stop good ones; the API key appears in no log."""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_helpers import (
    KEY,
    data_url,
    expected_greedy,
    image_message,
    png,
    post_head,
    processes_under,
    r1v_serve,
    raw_request,
)

WRONG_KEY = "wrong-key-ZZZ-0123456789"


@pytest.fixture(scope="module")
def served(tiny_assets):
    with r1v_serve(tiny_assets["model"], {
            "name": "tiny", "engine": {"num_cpus": 1, "max_batch": 8}, "torch_threads": 1,
            "preprocess": {"max_tiles": 2, "max_length": 1024}, "batching": {"max_batch_size": 8,
                                                                             "batch_wait_timeout_s": 1.0},
            "limits": {"max_images": 2, "max_image_pixels": 1000 * 1000, "max_n": 3, "max_total_tokens": 64,
                       "default_max_tokens": 8, "max_body_bytes": 256 * 1024, "request_timeout_s": 240}}) as s:
        yield {**s, "model": tiny_assets["model"]}


def test_openai_client_image_chat_through_ray_serve(served, tiny_png):
    client = served["client"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = image_message(data_url(tiny_png))
    want = expected_greedy(served["model"], tiny_png, "What is shown?", 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    two = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0.8, n=2, seed=3)
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0.8, n=2,
                                           seed=3)
    assert len(two.choices) == 2 and [c.message.content for c in two.choices] == [c.message.content
                                                                                   for c in again.choices]


def _stats(served) -> dict:
    status, body, _ = raw_request(served["port"], b"GET /r1v/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"Authorization: Bearer " + KEY.encode())
    assert status == 200
    return json.loads(body)


def test_concurrent_requests_share_engine_calls(served):
    images = [png(60 + 8 * i, 50, (40 * i, 100, 200 - 30 * i)) for i in range(4)]
    wants = [expected_greedy(served["model"], im, "Describe.", 6) for im in images]
    before = _stats(served)

    def ask(im):
        r = served["client"].chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                                     messages=image_message(data_url(im), "Describe."))
        return r.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, images))
    after = _stats(served)
    assert got == wants
    assert after["largest_batch"] > 1, after
    assert after["batches"] - before["batches"] < 4, (before, after)


def _outside_address() -> str | None:
    """An address of this machine other than loopback (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_guards_hold_through_ray_serve(served):
    ip = _outside_address()
    for port in (served["port"], int(served["internal"].rsplit(":", 1)[1])):
        if ip:  # both listen on loopback only
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=5).close()
    status, _, took = raw_request(served["port"], post_head(length=100_000, key=None))
    assert status == 401 and took < 10  # body_timeout_s is 30 s
    status, _, took = raw_request(served["port"], post_head(length=10 * 2**20))
    assert status == 413 and took < 10
    # Serve's own proxy (127.0.0.1 only) reaches the replicas, which check the key themselves too
    internal_port = int(served["internal"].rsplit(":", 1)[1])
    status, _, _ = raw_request(internal_port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert status == 401
    status, _, _ = raw_request(internal_port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"Authorization: Bearer " + WRONG_KEY.encode())
    assert status == 401


def test_a_flood_of_bad_requests_does_not_stop_good_ones(served, tiny_png):
    port = served["port"]
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    broken_png = bytearray(tiny_png)
    broken_png[60:120] = b"\x00" * 60
    bad_bodies = [
        b'{"model": "tiny", "messages": [',
        json.dumps({**good, "messages": image_message("data:image/png;base64,@@@")}).encode(),
        json.dumps({**good, "messages": image_message(data_url(bytes(broken_png)))}).encode(),
        json.dumps({**good, "model": "other"}).encode(),
        json.dumps({**good, "tools": []}).encode(),
        json.dumps({**good, "max_tokens": 100000}).encode(),
        json.dumps({**good, "messages": image_message("http://169.254.169.254/latest/meta-data")}).encode(),
    ]
    want = served["client"].chat.completions.create(**good).choices[0].message.content

    def bad(i):
        if i % 9 == 0:
            return raw_request(port, post_head(length=50, key=WRONG_KEY, extra=b"Connection: close"), b"{}")[0]
        if i % 9 == 1:
            return raw_request(port, post_head(length=10**9, extra=b"Connection: close"))[0]
        body = bad_bodies[i % len(bad_bodies)]
        return raw_request(port, post_head(length=len(body), extra=b"Connection: close"), body)[0]

    def ok(_):
        return served["client"].chat.completions.create(**good).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        bad_futures = [pool.submit(bad, i) for i in range(140)]
        good_futures = [pool.submit(ok, i) for i in range(4)]
        statuses = [f.result() for f in bad_futures]
        answers = [f.result() for f in good_futures]
    assert answers == [want] * 4
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert ok(0) == want


def test_the_key_is_in_no_output_or_log(served):
    time.sleep(2)  # let the replicas' log lines reach their files
    while not served["lines"].empty():
        served["output"].append(served["lines"].get())
    texts = ["".join(served["output"])]
    for p in Path(served["ray_tmp"]).rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 50 * 2**20:
            try:
                texts.append(p.read_text(errors="ignore"))
            except OSError:
                continue
    assert len(texts) > 5  # Ray's logs were read
    for secret in (KEY, WRONG_KEY):
        assert not any(secret in t for t in texts), secret


def test_sigterm_stops_the_server_and_its_cluster(served):
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert processes_under(served["ray_tmp"]) == []
