"""`r1v serve` for real: the CLI in a subprocess starts its own local Ray (2 CPUs), the Ray Serve application and
the front; the official `openai` client talks to it. Greedy answers equal the engine run directly; concurrent
requests share engine calls; a flood of bad requests does not stop good ones; under load, 32 concurrent clients get
the engine's own greedy answers without errors, and a replica killed mid-load (its process, found through Ray's GCS
actor table) is replaced by Serve and the server answers again, every request sent meanwhile ending at its client as
an answer or an error, none lost; the API key appears in no log; SIGTERM stops the server and its cluster. One
server for all of them (starting one costs about 15 CPU-s), in that order: the key check reads every log, SIGTERM
ends it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
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

RECOVERY_S = 120
"""How soon after its replica is killed the server must answer again (about 20 s on an idle 2-core machine: Serve's
health check every 10 s, then the new replica loads the model)."""

REPLICAS = r"""
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps([{"pid": a["Pid"], "state": a["State"], "id": a["ActorID"]} for a in state.actors().values()
                  if a["ActorClassName"].startswith("ServeReplica:r1v:chat")]))
"""


@pytest.fixture(scope="module")
def served(tiny_assets):
    with r1v_serve(tiny_assets["model"], {
            "name": "tiny", "engine": {"num_cpus": 1, "max_batch": 8}, "torch_threads": 1,
            "preprocess": {"max_tiles": 2, "max_length": 1024}, "batching": {"max_batch_size": 8,
                                                                             "batch_wait_timeout_s": 1.0},
            "limits": {"max_images": 2, "max_image_pixels": 1000 * 1000, "max_n": 3, "max_total_tokens": 64,
                       "default_max_tokens": 8, "max_body_bytes": 256 * 1024,
                       # under the killed-replica test's client timeout (150 s): a request lost with its replica
                       # ends as the server's 504, not as a client that gave up
                       "request_timeout_s": 60}}) as s:
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


def replicas(served) -> list[dict]:
    """The chat deployment's replica actors (pid, state) from the GCS actor table of the server's own cluster,
    read by a driver that joins it (the cluster has no dashboard, so `ray.util.state` is not served)."""
    port_file = next((Path(served["ray_tmp"]) / "ray" / "session_latest").glob("gcs_server_port_*"))
    gcs = f"127.0.0.1:{int(port_file.read_text().strip())}"
    out = subprocess.run([sys.executable, "-c", REPLICAS, gcs], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_TMPDIR": served["ray_tmp"],
                              # a new local cluster turns Ray's token auth on (the token in ~/.ray): join with it
                              "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_32_concurrent_clients_get_the_engines_answers(served):
    images = [png(48 + 4 * i, 40 + 2 * i, (15 * i, 120, 250 - 15 * i)) for i in range(16)]
    asks = [(im, f"What is in picture {i}?") for i, im in enumerate(images)] + \
           [(None, f"Add {i} and {i + 3}.") for i in range(16)]
    wants = [expected_greedy(served["model"], im, text, 6) for im, text in asks]
    client = served["client"]

    def ask(item):
        im, text = item
        messages = image_message(data_url(im), text) if im is not None else [{"role": "user", "content": text}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, asks))  # an error would raise here
    assert got == wants


def test_a_killed_replica_is_replaced_and_no_request_is_lost(served):
    client = served["client"]
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    want = client.chat.completions.create(**good).choices[0].message.content
    (old,) = [r for r in replicas(served) if r["state"] == "ALIVE"]
    lock = threading.Lock()
    log: list[tuple[float, float, str]] = []  # (sent at, ended at, "ok" | error kind), one per request sent
    sent = [0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with lock:
                sent[0] += 1
            t = time.monotonic()
            try:
                answer = client.chat.completions.create(**good, timeout=150).choices[0].message.content
                outcome = "ok" if answer == want else f"wrong answer {answer!r}"
            except openai.APIStatusError as e:
                outcome = f"HTTP {e.status_code}"
            except openai.APIError as e:  # connection errors, timeouts
                outcome = type(e).__name__
            with lock:
                log.append((t, time.monotonic(), outcome))
            if outcome != "ok":
                time.sleep(0.2)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(8)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while sum(o == "ok" for _, _, o in log) < 16 and time.monotonic() < deadline:
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(old["pid"], signal.SIGKILL)
    recovered_at = None
    while recovered_at is None and time.monotonic() < killed_at + RECOVERY_S:
        time.sleep(0.5)
        with lock:
            recovered_at = next((end for start, end, o in log if o == "ok" and start > killed_at + 1), None)
    time.sleep(2)
    stop.set()
    for th in threads:
        th.join(timeout=200)
    assert not any(th.is_alive() for th in threads)
    outcomes = [o for _, _, o in log]
    errors = [o for o in outcomes if o != "ok"]
    print(f"sent {sent[0]}, ok {len(outcomes) - len(errors)}, errors {len(errors)} {sorted(set(errors))}; "
          f"answering again {None if recovered_at is None else round(recovered_at - killed_at, 1)} s after the kill")
    assert recovered_at is not None, f"no answer within {RECOVERY_S} s of the kill; outcomes: {sorted(set(outcomes))}"
    assert sent[0] == len(outcomes)  # every request sent ended at its client: answered or an error
    # Failures are errors the server (or the front) reported: no wrong answer, no request left to time out.
    assert all(e.startswith("HTTP 5") for e in errors), sorted(set(errors))
    now = [r for r in replicas(served) if r["state"] == "ALIVE"]
    assert len(now) == 1 and now[0]["pid"] != old["pid"], now
    assert client.chat.completions.create(**good).choices[0].message.content == want


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
