"""`python tests/cluster/local_cluster.py ROOT WORKERS CPUS`: a Ray cluster of a head and WORKERS worker nodes on
127.0.0.1, in this process (one raylet per node, as Ray's own tests build them), until SIGTERM.

It runs in a process of its own so that no Ray state of the test process (a session's local cluster, a token
loaded earlier) reaches it. Writes ROOT/cluster.json (gcs, dashboard) once every node is up.

Worker nodes are removed and added back on request: a file `ROOT/ctl/N.json` holding `{"op": "remove" | "add",
"worker": I}` is answered by `ROOT/ctl/N.done` (its text: "ok" or the error). Removing a node kills its raylet and
every process on it at once (no graceful shutdown), as a lost machine does."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(root: Path, workers: int, cpus: int) -> None:
    # The head's temp dir is Ray's default under RAY_TMPDIR, where Ray notes "the current cluster": a job's driver
    # finds its cluster through that note (RAY_ADDRESS=auto), and no other cluster on the machine reads this one.
    os.environ["RAY_TMPDIR"] = str(root / "h")
    (root / "h" / "ray").mkdir(parents=True, exist_ok=True)
    os.environ["RAY_AUTH_MODE"] = "token"
    from r1v.core.loopback import loopback_only

    loopback_only()  # every Ray process takes 127.0.0.1 as its address; before Ray reads it at import
    from ray.cluster_utils import Cluster

    dashboard_port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node_ip_address="127.0.0.1", num_cpus=0, resources={"head": 1}, include_dashboard=True,
        env_vars={"R1V_CACHE": str(root / "cache" / "head")},  # each node its own cache, as on separate machines
        dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
        dashboard_agent_listen_port=_free_port()))  # not Ray's fixed default: another cluster may hold it
    nodes = {}

    def add(i: int) -> None:
        # a node added back gets a temp dir of its own: the removed node's sockets may linger in the old one
        n = sum(1 for d in root.iterdir() if d.name.startswith(f"w{i}"))
        nodes[i] = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=cpus,
                                    resources={f"worker{i}": 1, "worker": 1},
                                    temp_dir=str(root / (f"w{i}" if n == 0 else f"w{i}.{n}")),
                                    env_vars={"R1V_CACHE": str(root / "cache" / f"w{i}")})

    for i in range(workers):
        add(i)
    cluster.wait_for_nodes()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    (root / "ctl").mkdir(exist_ok=True)
    (root / "cluster.json.tmp").write_text(json.dumps({"gcs": cluster.address,
                                                       "dashboard": f"http://127.0.0.1:{dashboard_port}"}))
    os.replace(root / "cluster.json.tmp", root / "cluster.json")
    while not stop.wait(0.2):
        for req in sorted((root / "ctl").glob("*.json")):
            try:
                r = json.loads(req.read_text())
                if r["op"] == "remove":
                    cluster.remove_node(nodes.pop(r["worker"]), allow_graceful=False)
                elif r["op"] == "add":
                    add(r["worker"])
                    cluster.wait_for_nodes()
                else:
                    raise ValueError(f"unknown op {r['op']!r}")
                answer = "ok"
            except Exception as e:  # answered, not fatal: the test reads it
                answer = f"{type(e).__name__}: {e}"
            req.with_suffix(".done").write_text(answer)
            req.unlink()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
