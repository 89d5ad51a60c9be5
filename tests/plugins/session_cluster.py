"""`python session_cluster.py ROOT CPUS`: the test session's local Ray cluster, started the way `r1v run` starts one
(`r1v.cli.app.init_ray`: on 127.0.0.1, dashboard on), held by this process until SIGTERM.

One cluster for every xdist worker rather than one each: an idle local cluster costs about 0.15 to 0.2 of a core
(dashboard and its modules, agents, log monitor, GCS, raylet, idle workers), a sixth of CI's two cores for each
cluster the session keeps up. Writes ROOT/session.json (the GCS address) once the cluster is up."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path


def main(root: Path, cpus: int) -> None:
    os.environ["RAY_TMPDIR"] = str(root)  # short: Ray's unix sockets live under it
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    from r1v.cli.app import init_ray

    try:
        init_ray(None, cpus)
    except Exception as e:  # Ray gives a new node 30 s to register, which a loaded 2-core machine can miss
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        init_ray(None, cpus)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tmp = root / "session.json.tmp"
    tmp.write_text(json.dumps({"gcs": ray.get_runtime_context().gcs_address}))
    os.replace(tmp, root / "session.json")
    while not stop.wait(1.0):
        pass
    ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
