"""Load on `r1v serve`: throughput and latency under N concurrent clients, against one request at a time.

Starts `r1v serve` (its own local Ray cluster, the transformers engine) on 127.0.0.1 in a subprocess, then for each
client count drives it with that many concurrent `openai` clients sending a mix of image and text requests (the
miniature world's problems: the digit grid as a PNG, or written out), greedy, until `--requests` answers or
`--max-seconds`. Prints, per client count: requests/s, generated tokens/s, p50/p95/p99 latency, errors, the engine
batches the server made (its `/r1v/stats`), and the throughput relative to one client (one request at a time on
the same server and engine in the same run: what batching buys). Usage:

    python bench/serve_load.py [--clients 1,8,32] [--requests 64] [--max-tokens 48] [--model DIR]

Without `--model` it serves the miniature world's R1V model (the substitute VLM with the reasoning LLM, built
offline from the shipped backbones, as bench/vllm_vs_transformers.py does).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import queue
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "plugins"))


def world_model(tmp: Path) -> str:
    from r1v.model.manifest import reassemble_model
    from r1v.world.load import substitute_vlm

    sub = substitute_vlm(None, 0, tmp / "substitute")
    return str(reassemble_model(sub["model"], sub["reasoning_llm"], tmp / "r1v"))


def world_messages(num: int, seed: int = 0) -> list[tuple[str, list[dict[str, Any]]]]:
    """`num` requests' messages, alternately the image form (a PNG data URL) and the text form of a problem."""
    from r1v.world.domain import labelled_digits, make_problem
    from r1v.world.render import render_digits

    rng = random.Random(seed)
    out = []
    for i in range(num):
        p = make_problem(rng, "test")
        if i % 2 == 0:
            b = io.BytesIO()
            render_digits(p.digits, rng).save(b, "PNG")
            url = "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()
            out.append(("image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                               {"type": "text", "text": p.question()}]}]))
        else:
            out.append(("text", [{"role": "user", "content": f"Grid: {labelled_digits(p.digits)}\n{p.question()}"}]))
    return out


def start_server(model: str, cfg: dict[str, Any], tmp: Path, key: str) -> tuple[subprocess.Popen, int]:
    """`r1v serve` in its own process group; (process, port) once it announces its address."""
    import yaml

    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "R1V_API_KEY": key, "RAY_TMPDIR": str(tmp / "ray")}
    (tmp / "ray").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "r1v.cli", "serve", model, "--config", str(tmp / "serve.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1 ", line):
                return proc, int(m.group(1))
    except BaseException:  # interrupted while it starts: stop it too
        stop_server(proc)
        raise
    stop_server(proc)
    raise RuntimeError("r1v serve did not start:\n" + "".join(seen[-30:]))


def stop_server(proc: subprocess.Popen) -> None:
    from r1v_test_servers import stop_process  # the test suite's: SIGTERM, then SIGKILL to its group

    stop_process(proc, 90)


def server_stats(port: int, key: str) -> dict[str, int]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/r1v/stats", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))] if s else float("nan")


def drive(client: Any, name: str, messages: list[tuple[str, list[dict[str, Any]]]], clients: int, requests: int,
          max_seconds: float, max_tokens: int) -> dict[str, Any]:
    """`clients` threads send requests (cycling through `messages`) until `requests` were sent or `max_seconds`
    passed; every request ends as an answer or an error."""
    lock = threading.Lock()
    sent = [0]
    lat: list[float] = []
    tokens = [0]
    errors: list[str] = []
    kinds = {"image": 0, "text": 0}
    t0 = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if sent[0] >= requests or time.monotonic() - t0 > max_seconds:
                    return
                kind, msgs = messages[sent[0] % len(messages)]
                sent[0] += 1
            t = time.monotonic()
            try:
                r = client.chat.completions.create(model=name, messages=msgs, max_tokens=max_tokens, temperature=0)
                with lock:
                    lat.append(time.monotonic() - t)
                    tokens[0] += r.usage.completion_tokens
                    kinds[kind] += 1
            except Exception as e:  # noqa: BLE001  (counted and reported)
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    dt = time.monotonic() - t0
    return {"clients": clients, "sent": sent[0], "ok": len(lat), "errors": len(errors), "error_examples": errors[:3],
            "image": kinds["image"], "text": kinds["text"], "seconds": round(dt, 2),
            "requests_per_s": round(len(lat) / dt, 3), "tokens_per_s": round(tokens[0] / dt, 1),
            "completion_tokens": tokens[0], "p50_s": round(pct(lat, 50), 3), "p95_s": round(pct(lat, 95), 3),
            "p99_s": round(pct(lat, 99), 3), "mean_s": round(statistics.fmean(lat), 3) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the miniature world's R1V model)")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts; 1 is always run first")
    ap.add_argument("--requests", type=int, default=64, help="requests per client count")
    ap.add_argument("--max-seconds", type=float, default=180, help="stop sending after this long per count")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    ap.add_argument("--max-batch-size", type=int, default=32, help="Serve's batching.max_batch_size")
    ap.add_argument("--batch-wait-s", type=float, default=0.02, help="Serve's batching.batch_wait_timeout_s")
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args()
    counts = sorted({1, *(int(x) for x in args.clients.split(","))})

    import openai

    tmp = Path(tempfile.mkdtemp(prefix="r1v-bench-serve-", dir="/tmp"))
    model = args.model or world_model(tmp)
    key = secrets.token_urlsafe(24)
    cfg = {"name": "bench", "port": 0, "ray": {"num_cpus": args.ray_cpus}, "torch_threads": args.threads,
           "engine": {"kind": "transformers", "num_cpus": 1, "max_batch": 64},
           "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s},
           "preprocess": {"max_tiles": 2, "max_length": 1024},
           "replicas": {"num_replicas": 1, "max_ongoing_requests": max(64, 2 * max(counts))}}
    load0 = f"{os.getloadavg()[0]:.1f}"
    t = time.monotonic()
    proc, port = start_server(model, cfg, tmp, key)
    started = round(time.monotonic() - t, 1)
    messages = world_messages(max(64, args.requests))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
    results = []
    try:
        drive(client, "bench", messages, 4, 8, 120, args.max_tokens)  # warm-up: first-call allocations
        for c in counts:
            before = server_stats(port, key)
            res = drive(client, "bench", messages, c, args.requests, args.max_seconds, args.max_tokens)
            after = server_stats(port, key)
            batches = after["batches"] - before["batches"]
            res["engine_batches"] = batches
            res["mean_batch"] = round((after["batched_requests"] - before["batched_requests"]) / max(1, batches), 2)
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        stop_server(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    base = results[0]["requests_per_s"] or float("nan")
    head = (f"{'clients':>7} {'ok':>4} {'err':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
            f"{'batch':>6} {'x 1 client':>10}")
    print(f"\nload average before/after: {load0} / {os.getloadavg()[0]:.1f}; CPUs: {os.cpu_count()}")
    print(f"r1v serve on {model} (transformers engine, {args.threads} torch thread(s), start-up {started} s); "
          f"{args.requests} requests per count (half image, half text), greedy, max_tokens {args.max_tokens}")
    print(head)
    for r in results:
        print(f"{r['clients']:>7} {r['ok']:>4} {r['errors']:>4} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} "
              f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f} {r['p99_s']:>7.2f} {r['mean_batch']:>6.1f} "
              f"{r['requests_per_s'] / base:>10.2f}")


if __name__ == "__main__":
    main()
