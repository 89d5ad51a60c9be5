"""A Ray cluster of a head and two worker nodes on 127.0.0.1 for the session (`local_cluster.py`, a process the
session starts and stops by pid), shared by the xdist workers: their tests submit jobs to it side by side, as users
of one cluster do (`r1v_test_servers.shared`). A test that removes nodes starts a cluster of its own (`own_cluster`).

- Each node has its own temp dir and a custom resource (`head`, `worker0`, `worker1`; workers also `worker`).
- A worker node of the shared cluster has 5 CPUs: three jobs at once (one per xdist worker), each with 2 trainers of
  1 CPU, still leave CPUs for the Ray Data tasks that feed them (trainers that hold every CPU make their data tasks
  wait forever). One of `own_cluster` has 3: when one node is removed, a 2-worker SFT group and its data tasks still
  fit on the other.
- The head has no CPUs, as on a real cluster: the driver runs there; trainers, engines and Ray Data tasks run on
  the workers.
- Every address is the loopback one. Ray otherwise picks the machine's interface address, which on these machines
  need not even be reachable.
- Ray 2.60 turns token authentication on for a new cluster; the cluster uses the machine's token
  (~/.ray/auth_token), and so do the clients here (RAY_AUTH_MODE=token, set by tests/conftest.py).
- An S3-compatible server (moto, `cluster_s3`) runs beside it; every node gets its endpoint and credentials from
  the environment the cluster starts with (never from a job's runtime_env, which the dashboard shows), and its own
  cache (R1V_CACHE) for what it stages from the store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from r1v_test_servers import shared, shared_dir, stop_process

HERE = Path(__file__).resolve().parent


class LocalCluster:
    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root, self.env = root, env or {}
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, str] = {}

    @property
    def gcs(self) -> str:
        return self.info["gcs"]

    @property
    def dashboard(self) -> str:
        return self.info["dashboard"]

    def start(self, workers: int = 2, cpus_per_worker: int = 3, timeout: float = 300, tries: int = 2) -> LocalCluster:
        """Start the cluster; a start that fails (a loaded 2-core machine can miss Ray's deadlines) is retried in a
        fresh directory."""
        for attempt in range(tries):
            try:
                return self._start(workers, cpus_per_worker, timeout)
            except Exception as e:  # nothing left running: no one else knows its pid yet
                self.stop()
                if not isinstance(e, RuntimeError) or attempt == tries - 1:
                    raise
                shutil.rmtree(self.root, ignore_errors=True)
                self.root.mkdir(parents=True)
        raise AssertionError("unreachable")

    @classmethod
    def attach(cls, root: Path) -> LocalCluster:
        """The cluster another process started in `root`."""
        c = cls(root)
        c.info = json.loads((root / "cluster.json").read_text())
        return c

    def _start(self, workers: int, cpus_per_worker: int, timeout: float) -> LocalCluster:
        log = open(self.root / "cluster.log", "ab")
        # RAY_ADDRESS names the session's local cluster once that started: inherited, it would send this cluster's
        # job drivers there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | self.env
        self.proc = subprocess.Popen([sys.executable, str(HERE / "local_cluster.py"), str(self.root), str(workers),
                                      str(cpus_per_worker)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        t0 = time.monotonic()
        while not (self.root / "cluster.json").exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the cluster did not start: {(self.root / 'cluster.log').read_text()[-3000:]}")
            time.sleep(0.5)
        self.info = json.loads((self.root / "cluster.json").read_text())
        ips = {n["raylet"]["nodeManagerAddress"] for n in self.nodes() if n["raylet"]["state"] == "ALIVE"}
        assert ips == {"127.0.0.1"}, ips  # all traffic on loopback
        return self

    def nodes(self) -> list[dict]:
        from ray._raylet import AuthenticationTokenLoader

        req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                     headers=AuthenticationTokenLoader.instance().get_token_for_http_header())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["data"]["summary"]

    def control(self, op: str, worker: int, timeout: float = 120) -> None:
        """Remove (`op` "remove": killed at once, as a lost machine) or add back worker node `worker`."""
        name = f"{time.time_ns()}"
        tmp = self.root / "ctl" / f"{name}.tmp"
        tmp.write_text(json.dumps({"op": op, "worker": worker}))
        tmp.rename(tmp.with_suffix(".json"))
        done = tmp.with_suffix(".done")
        t0 = time.monotonic()
        while not done.exists():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{op} worker {worker}")
            time.sleep(0.2)
        assert done.read_text() == "ok", done.read_text()

    def stop(self) -> None:
        stop_process(self.proc, 120)  # the launcher shuts its nodes down on SIGTERM


@pytest.fixture(scope="session")
def local_cluster(cluster_s3):
    # a short root: Ray's unix sockets live under each node's temp dir and their paths must fit in 107 bytes
    root = shared_dir() / "c"

    def start() -> dict:
        shutil.rmtree(root, ignore_errors=True)  # one stopped after its last user (tests/conftest.py), re-run
        root.mkdir()
        c = LocalCluster(root, cluster_s3.env).start(cpus_per_worker=5)
        return {"pid": c.proc.pid, "group": False, "root": str(root)}

    return LocalCluster.attach(Path(shared("cluster", start)["root"]))


@pytest.fixture()
def own_cluster(cluster_s3):
    """A head and two worker nodes of 3 CPUs for one test, which may remove and add its nodes."""
    root = Path(tempfile.mkdtemp(prefix="r1vc-", dir="/tmp"))
    cluster = LocalCluster(root, cluster_s3.env)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_assets(tmp_path_factory) -> dict[str, str]:
    """The tiny VLM (what a `model.tiny` stage builds) and synthetic corpora of 41 and 201 rows, one corrupt, for the
    cluster tests' SFT stages: built once, in this process, on a path every node of the local cluster sees."""
    from r1v.data.synthetic import generate
    from r1v.model.config import TinyModelConfig
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm
    from r1v.model.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("cluster-assets")
    c = TinyModelConfig()
    vlm, tok = build_tiny_vlm(TinySpec(**c.model_dump(exclude={"reasoning_seed"})),
                              tokenizer=build_tiny_tokenizer(vocab_size=c.vocab_size))
    data = generate(root / "data", n_train=41, n_test=4, seed=0, corrupt_rows=1)
    # an epoch of 50 steps, for a stop that must land while the stage still trains: on a loaded machine the
    # workers trained 15 to 20 more steps between a checkpoint and the stop taking effect
    long = generate(root / "data-long", n_train=201, n_test=1, seed=1, corrupt_rows=1)
    return {"model": str(save_model(vlm, tok, root / "vlm")), "train": str(data["train"]),
            "train_long": str(long["train"])}


def r1v_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def r1v(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`r1v ARGS` in a process of its own, as a user runs it: a test process that already drives another Ray
    cluster (the session's local one) must not lend the CLI its Ray state."""
    return subprocess.run([sys.executable, "-m", "r1v.cli", *args], capture_output=True, text=True, env=r1v_env(),
                          timeout=timeout)
