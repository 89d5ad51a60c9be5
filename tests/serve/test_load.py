"""`r1v serve` under load (its own 2-CPU Ray cluster, one replica of the tiny model): 32 concurrent clients get the
engine's own greedy answers without errors; a replica killed mid-load (its process, found through Ray's GCS actor
table) is replaced by Serve and the server answers again, and every request sent meanwhile ends at its client as an
answer or an error, none lost. (A flood of bad requests beside good ones: test_ray_serve.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from serve_helpers import data_url, expected_greedy, image_message, png, r1v_serve

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
            "name": "tiny", "engine": {"num_cpus": 1, "max_batch": 32}, "torch_threads": 1,
            "preprocess": {"max_tiles": 2, "max_length": 1024},
            "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.05},
            "replicas": {"num_replicas": 1, "max_ongoing_requests": 64},
            "limits": {"request_timeout_s": 60, "default_max_tokens": 8}}) as s:
        yield {**s, "model": tiny_assets["model"]}


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
