"""Servers that tests start on 127.0.0.1 and stop by pid."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float, group: bool = False) -> None:
    """SIGTERM to `proc` (to its whole process group when `group`), SIGKILL to the group after `timeout` s."""
    if proc is None or proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Server:
    """A server process in its own process group, started until its health URL answers 200, stopped by its pid."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or _free_port()
        self.proc: subprocess.Popen | None = None

    def _launch(self, cmd: list[str], log: str, health: str, what: str, timeout: float, poll: float,
                env: dict[str, str] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=os.environ | (env or {}))
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{what} did not start: {(self.root / log).read_text()[-2000:]}")
            time.sleep(poll)

    def stop(self) -> None:
        stop_process(self.proc, 20, group=True)
        self.proc = None


class MlflowServer(_Server):
    """`mlflow server --serve-artifacts` on 127.0.0.1, in its own process group, stopped by its pid."""

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        # MLflow 3's job runner (GenAI scorers and the like, which r1v does not use) would start seven more
        # processes of about 240 MB each beside the server
        self._launch(cmd, "server.log", f"{self.uri}/health", "mlflow server", timeout, 0.3,
                     env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        return self


class S3Server(_Server):
    """moto's S3-compatible server on 127.0.0.1 (`python -m moto.server`), in its own process group, stopped by
    its pid. `env` is what a client needs (endpoint, region, dummy credentials)."""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
                "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60) -> S3Server:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._launch(cmd, "s3.log", f"{self.endpoint}/moto-api/", "moto server", timeout, 0.2)
        return self

    def create_bucket(self, name: str) -> str:
        """Create `name` (S3's own PUT Bucket) and return `s3://name`."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status
        return f"s3://{name}"


# Services shared by every xdist worker of a session (one multi-node cluster, one S3 server, one tracking server
# rather than one per worker): the first worker to ask starts one, under a lock, and records it in the session's
# shared directory (R1V_TEST_SHARED, made by the controller); the controller stops them all when the session ends.


def shared_dir() -> Path:
    return Path(os.environ["R1V_TEST_SHARED"])


def shared(name: str, start) -> dict:
    """The record of shared service `name`, started by `start()` (which returns a JSON-able dict with the "pid"
    to stop and "group": whether to signal its whole process group) if no worker has started it yet."""
    import fcntl
    import json

    d = shared_dir()
    with open(d / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = d / f"{name}.json"
        if p.exists():
            return json.loads(p.read_text())
        info = start()
        p.with_suffix(".tmp").write_text(json.dumps(info))
        p.with_suffix(".tmp").rename(p)
        return info


def release_when_done(name: str, users: set[str], finished: str) -> bool:
    """Record that test `finished`, one of the `users` of shared service `name`, has ended; when every user has,
    stop the service and drop its record (a later user, such as a re-run, starts a fresh one). Returns whether this
    call stopped it. Its users run on several xdist workers: each worker collects them all, and the record of who
    ended is a file of the session's shared directory, under the service's lock."""
    import fcntl
    import json

    if finished not in users:
        return False
    d = shared_dir()
    with open(d / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = d / f"{name}.done"
        with done.open("a") as f:
            f.write(finished + "\n")
        rec = d / f"{name}.json"
        if not rec.exists() or not users <= set(done.read_text().splitlines()):
            return False
        info = json.loads(rec.read_text())
        rec.unlink()
        stop_recorded([info])
        return True


def stop_shared(d: Path, timeout: float = 120) -> None:
    """Stop every service recorded in `d`: SIGTERM, then SIGKILL to its process group after `timeout`."""
    import json

    stop_recorded([json.loads(p.read_text()) for p in d.glob("*.json")], timeout)


def stop_recorded(infos: list[dict], timeout: float = 120) -> None:
    """Stop the services of these `shared` records: SIGTERM, then SIGKILL to the process group after `timeout`."""
    def alive(pid: int) -> bool:
        try:  # a zombie (its parent, maybe this process, has not reaped it yet) has exited too
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    for info in infos:
        try:
            (os.killpg if info.get("group") else os.kill)(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    while any(alive(i["pid"]) for i in infos) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    for info in infos:
        try:
            os.killpg(info["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


SESSION_CPUS = 6
"""The session cluster's CPUs: the 2 each xdist worker's tests had on a cluster of their own, times three."""


def start_session_cluster(root: Path, timeout: float = 300) -> dict:
    """`session_cluster.py` in a process group of its own, until its cluster is up; the record `shared` keeps
    (pid, group, root and the cluster's GCS address)."""
    import json

    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_XDIST_WORKER")}
    log = root / "cluster.log"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("session_cluster.py")), str(root),
                             str(SESSION_CPUS)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    t0 = time.monotonic()
    while not (root / "session.json").exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            stop_process(proc, 30, group=True)
            raise RuntimeError(f"the session cluster did not start: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    return {"pid": proc.pid, "group": True, "root": str(root)} | json.loads((root / "session.json").read_text())


SERVE_KEY = "test-key-0123456789abcdef"
"""The API key of the `r1v serve` servers tests start."""


def processes_under(path: str) -> list[int]:
    """Pids of live processes whose command line mentions `path` (a Ray cluster's temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if path.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@contextlib.contextmanager
def r1v_serve(model: str, config: dict[str, Any], start_timeout_s: float = 420) -> Iterator[dict[str, Any]]:
    """`r1v serve MODEL --config C` in a subprocess with its own Ray cluster (2 CPUs, its own temp dir) and
    R1V_API_KEY=SERVE_KEY; yields port, internal (Serve's URL), an `openai` client, the process, its output so far
    and the queue of later lines, the Ray temp dir. Stopped (SIGTERM, then SIGKILL of its process group) at the end."""
    import openai
    import yaml

    ray_tmp = tempfile.mkdtemp(prefix="r1vsv-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cfg = Path(ray_tmp) / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"port": 0, "ray": {"num_cpus": 2}, **config}))
    env = {**os.environ, "R1V_API_KEY": SERVE_KEY, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "r1v.cli", "serve", model, "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline, m = time.monotonic() + start_timeout_s, None
    pattern = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1 \(API key required; Ray Serve at (http://127\.0\.0\.1:\d+)\)")
    try:
        while m is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            m = pattern.search(line)
        if m is None:
            raise RuntimeError("r1v serve did not start:\n" + "".join(seen[-40:]))
        port = int(m.group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SERVE_KEY, max_retries=0, timeout=240)
        yield {"port": port, "internal": m.group(2), "client": client, "proc": proc, "output": seen,
               "lines": lines, "ray_tmp": ray_tmp}
    finally:
        stop_process(proc, 90)
        shutil.rmtree(ray_tmp, ignore_errors=True)
