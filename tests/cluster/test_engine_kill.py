"""A rollout engine actor killed (SIGKILL, by pid) mid-GRPO on the head + two workers cluster (127.0.0.1): Ray
restarts it, it gets the trained weights back, the lost rollout is re-run with the same seeds and the stage
finishes; the metrics of the step re-run after the kill and of the next one equal those of an unkilled run
(the same stage, submitted beside it). Both drivers join the cluster from processes of their own; their trainers
and engines run on the worker nodes. The test host (`tests/plugins/r1v_test_engines.py`) only adds control files
to the real engine; a hung engine's deadline is tested on local Ray (tests/rl/test_engine_failures.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.conftest import r1v_env

HERE = Path(__file__).resolve().parent

DRIVER = """
import json, sys, threading
from pathlib import Path
sys.path[:0] = [{tests!r}, {rl!r}]
from test_engine_failures import _grpo, _kill_when_waiting
from r1v.cli.app import init_ray
from r1v.rl.grpo import train_grpo
from r1v.workflow import tracking
from r1v_test_engines import ControlledHost
import ray

cfg = json.loads(sys.argv[1])
init_ray(None, None)  # RAY_ADDRESS: the cluster's
uri = f"sqlite:///{{cfg['root']}}/mlflow.db"
run = tracking.start_run(uri, tracking.ensure_experiment(uri, "engine-kill"), "grpo")
killer = None
if cfg["kill"]:
    # step 2's rollout of rank 1 (seed 0 * 100_003 + 2 * 1009 + rank 1): that rank's own engine (2 engines)
    open(cfg["root"] + "/kill-at-seed", "w").write(str(2 * 1009 + 1))
    killer = threading.Thread(target=_kill_when_waiting, args=(Path(cfg["root"]),), daemon=True)
    killer.start()
train_grpo(_grpo(cfg["model"], cfg["corpus"], engine={{"num_engines": 2}}), Path(cfg["root"]) / "grpo", uri, run,
           host=ControlledHost)
if killer is not None:
    killer.join(timeout=5)
print("RESULT", json.dumps({{"run": run, "uri": uri, "job": ray.get_runtime_context().get_job_id()}}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_engine_is_replaced_and_its_steps_equal_an_unkilled_runs(local_cluster, tiny_assets, tmp_path):
    import shutil

    from ray.util.state import list_actors, list_nodes
    from rl.test_engine_failures import _metrics

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(HERE.parent), rl=str(HERE.parent / "rl")))
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray takes 127.0.0.1 as this machine's address (as the cluster's nodes
    # do), instead of rewriting the cluster's 127.0.0.1 address to the machine's interface address
    env = r1v_env() | {"RAY_ADDRESS": local_cluster.gcs, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    procs = {}
    for name in ("unkilled", "killed"):  # side by side on the cluster
        root = tmp_path / name
        root.mkdir()
        model = shutil.copytree(tiny_assets["model"], root / "vlm")  # the control files go beside it
        cfg = {"root": str(root), "model": str(model), "corpus": tiny_assets["train"], "kill": name == "killed"}
        procs[name] = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results = {}
    for name, p in procs.items():
        out = p.communicate(timeout=1100)[0]
        assert p.returncode == 0, out[-4000:]
        results[name] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
        assert (tmp_path / name / "grpo" / "model").exists()
    control = tmp_path / "killed"
    assert (control / "killed").exists()
    assert len((control / "starts").read_text().split()) == 3  # two engines, one restarted
    assert len((tmp_path / "unkilled" / "starts").read_text().split()) == 2

    unkilled, killed = (_metrics(results[n]["uri"], results[n]["run"]) for n in ("unkilled", "killed"))
    assert sorted(killed) == [0, 1, 2, 3]
    for step in (2, 3):  # the step re-run after the kill, and the next one
        assert killed[step] == pytest.approx(unkilled[step], rel=1e-6, abs=1e-9), step

    # the engines (the restarted one too) and the trainers ran on worker nodes, not on the head
    nodes = {n.node_id: n.resources_total for n in list_nodes(address=local_cluster.dashboard, detail=True)}
    for name in results:
        actors = [a for a in list_actors(address=local_cluster.dashboard, detail=True, limit=10_000,
                                         filters=[("job_id", "=", results[name]["job"])])
                  if a.class_name in ("ControlledHost", "RayTrainWorker")]
        assert {a.class_name for a in actors} == {"ControlledHost", "RayTrainWorker"}, name
        assert all("worker" in nodes[a.node_id] and "head" not in nodes[a.node_id] for a in actors), name
