"""A Ray cluster of a head and two worker nodes on 127.0.0.1, started with `ray start` processes this session owns
and stops by pid: each node has its own temp dir and a custom resource, the head has no CPUs (as on a real
cluster: the driver runs there, trainers, engines and Ray Data tasks on the workers), and every address is the
loopback one (Ray otherwise picks the machine's interface address)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        tmp = self.root / name
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_ADDRESS": ""}
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *args], env=env,
            stdout=open(tmp / "ray-start.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, workers: int = 2, cpus_per_worker: int = 2) -> LocalCluster:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                             "--resources", json.dumps({"head": 1}), "--temp-dir", str(self.root / "head")])
        self.wait_dashboard()
        for i in range(workers):
            self.add_worker(f"worker{i}", cpus_per_worker)
        self.wait_nodes(1 + workers)
        return self

    def add_worker(self, name: str, cpus: int) -> None:
        self._start(name, ["--address", self.gcs, "--num-cpus", str(cpus),
                           "--resources", json.dumps({name: 1, "worker": 1})])

    def wait_dashboard(self, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the head's dashboard did not come up: {self.log('head')}")

    def nodes(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.dashboard}/nodes?view=summary", timeout=10) as r:
            return json.loads(r.read())["data"]["summary"]

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                alive = [x for x in self.nodes() if x.get("raylet", {}).get("state") == "ALIVE"]
                if len(alive) >= n:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{n} nodes did not join: " + " | ".join(self.log(k) for k in self.procs))

    def log(self, name: str) -> str:
        p = self.root / name / "ray-start.log"
        return p.read_text()[-1500:] if p.exists() else ""

    def stop_node(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            self.stop_node(name)


@pytest.fixture(scope="session")
def local_cluster():
    # A short root: Ray's unix sockets live under each node's temp dir and their paths must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="r1vc-", dir="/tmp"))
    cluster = LocalCluster(root).start()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
