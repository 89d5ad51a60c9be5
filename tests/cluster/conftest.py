"""A Ray cluster of a head and two worker nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`: one raylet per node, as
Ray's own tests do), owned by this session and stopped with it.

- Each node has its own temp dir and a custom resource (`head`, `worker0`, `worker1`; workers also `worker`).
- The head has no CPUs, as on a real cluster: the driver runs there; trainers, engines and Ray Data tasks run on
  the workers.
- Every address is the loopback one. Ray otherwise picks the machine's interface address, which on these machines
  need not even be reachable. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes every Ray process (raylets, workers, job
  drivers) take 127.0.0.1 as its node address.
- Ray 2.60 turns token authentication on for a new cluster: the cluster and this session share a token of their
  own (RAY_AUTH_MODE / RAY_AUTH_TOKEN).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest

ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dashboard_port = _free_port()
        self.cluster = None
        self.workers: dict[str, object] = {}

    @property
    def gcs(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, workers: int = 2, cpus_per_worker: int = 2) -> LocalCluster:
        import ray._private.ray_constants as rc
        from ray.cluster_utils import Cluster

        rc.ENABLE_RAY_CLUSTER = False  # this process too (Ray read the variable when it was imported)
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            node_ip_address="127.0.0.1", num_cpus=0, resources={"head": 1}, include_dashboard=True,
            dashboard_host="127.0.0.1", dashboard_port=self.dashboard_port, temp_dir=str(self.root / "head"),
            dashboard_agent_listen_port=_free_port()))  # not Ray's fixed default: another cluster may hold it
        for i in range(workers):
            self.add_worker(f"worker{i}", cpus_per_worker)
        self.cluster.wait_for_nodes()
        ips = {n["raylet"]["nodeManagerAddress"] for n in self.nodes() if n["raylet"]["state"] == "ALIVE"}
        assert ips == {"127.0.0.1"}, ips  # all traffic on loopback
        return self

    def add_worker(self, name: str, cpus: int):
        node = self.cluster.add_node(node_ip_address="127.0.0.1", num_cpus=cpus,
                                     resources={name: 1, "worker": 1}, temp_dir=str(self.root / name))
        self.workers[name] = node
        return node

    def remove_worker(self, name: str) -> None:
        self.cluster.remove_node(self.workers.pop(name))

    def nodes(self) -> list[dict]:
        req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["data"]["summary"]

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()


@pytest.fixture(scope="session")
def local_cluster():
    saved = {k: os.environ.get(k) for k in (*ENV, "RAY_AUTH_TOKEN")}
    os.environ.update(ENV, RAY_AUTH_TOKEN=secrets.token_hex(32))
    # a short root: Ray's unix sockets live under each node's temp dir and their paths must fit in 107 bytes
    root = Path(tempfile.mkdtemp(prefix="r1vc-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
