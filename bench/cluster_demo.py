"""The demo, submitted to a cluster: `r1v submit workflows/tiny.yaml --follow` on a head and two worker nodes.

    python bench/cluster_demo.py [--run-root DIR_OR_URI] [--keep]

Starts a Ray cluster of a head (no CPUs: only the job's driver runs there) and two worker nodes on 127.0.0.1
(`tests/cluster/local_cluster.py`, the test suite's) and an MLflow tracking server (`mlflow server
--serve-artifacts`, tests/plugins/r1v_test_servers.py), submits the tiny workflow with the run root on a path
every node sees (by default a fresh directory; `--run-root s3://...` for an object store, with the endpoint and
credentials in the environment), follows it to its results table, and then shows where its actors ran: every
Ray Train worker and every engine actor on a worker node. Everything is stopped at the end (`--keep` leaves the
run directory). Takes the demo's time plus about a minute of start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "plugins"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-root", help="run root (default: a fresh directory every node sees)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args()
    os.environ["RAY_AUTH_MODE"] = "token"
    from cluster.conftest import LocalCluster
    from r1v_test_servers import MlflowServer

    base = Path(tempfile.mkdtemp(prefix="r1vd-", dir="/tmp"))
    (base / "c").mkdir()
    cluster, mlflow = LocalCluster(base / "c"), MlflowServer(base / "mlflow")
    run_root = args.run_root or str(base / "shared" / "runs")
    try:
        t0 = time.monotonic()
        cluster.start()
        mlflow.start()
        print(f"cluster {cluster.dashboard} and MLflow {mlflow.uri} up in {time.monotonic() - t0:.0f} s", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [sys.executable, "-m", "r1v.cli", "submit", str(ROOT / "workflows" / "tiny.yaml"),
               f"tracking.tracking_uri={mlflow.uri}", "--run-root", run_root, "--address", cluster.dashboard,
               "--follow"]
        print("$ r1v " + " ".join(cmd[3:]), flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        print(f"r1v submit --follow: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)

        from ray.util.state import list_actors, list_nodes

        nodes = {n.node_id: n for n in list_nodes(address=cluster.dashboard, detail=True)}

        def where(node_id: str) -> str:
            res = nodes[node_id].resources_total
            return next((k for k in sorted(res) if k.startswith("worker") and k != "worker"), "head")

        actors = list_actors(address=cluster.dashboard, detail=True, limit=10_000)
        placed = Counter((a.class_name, where(a.node_id)) for a in actors
                         if a.class_name in ("RayTrainWorker", "EngineHost", "EvalEngineHost"))
        print("where the actors ran (class, node): count")
        for (cls, node), n in sorted(placed.items()):
            print(f"  {cls:16s} {node:8s} {n}")
        on_head = sum(n for (_, node), n in placed.items() if node == "head")
        print(f"trainers and engines on the head: {on_head}")
        return rc or int(on_head > 0)
    finally:
        cluster.stop()
        mlflow.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
