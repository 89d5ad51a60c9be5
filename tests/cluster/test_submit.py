"""`r1v submit` on a head and two worker nodes (127.0.0.1): the job runs the workflow with its run root on a path
every node sees and MLflow on a tracking server; trainers run on worker nodes; `status` names the job; `stop`
interrupts it and `resume --address` finishes it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from r1v_test_servers import MlflowServer

from cluster.conftest import r1v
from r1v.workflow.runner import Runner

WORKFLOW = """
name: submitted
run_root: {root}
tracking: {{tracking_uri: "{uri}", experiment: cluster}}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 61, n_test: 4, corrupt_rows: 1}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 4,
             optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 2, cpus_per_worker: 1}}}}
"""


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield s
    s.stop()


def _workflow(tmp_path: Path, uri: str) -> Path:
    p = tmp_path / "wf.yaml"  # outside the checkout: submit ships it in the package
    p.write_text(WORKFLOW.format(root=tmp_path / "shared" / "runs", uri=uri))
    return p


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submit_runs_the_workflow_on_worker_nodes(local_cluster, tracking_server, tmp_path, capsys):
    wf = _workflow(tmp_path, tracking_server.uri)
    t0 = time.monotonic()
    res = r1v("submit", str(wf), "--address", local_cluster.dashboard, "--follow")
    out = res.stdout
    assert res.returncode == 0, (out + res.stderr)[-4000:]
    run_dir = Path(next(line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("r1v: run ")))
    assert run_dir.parent == tmp_path / "shared" / "runs"
    runner = Runner.open(run_dir)
    assert [r["status"] for r in runner.status_rows()] == ["done"] * 3
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["job"]["address"] == local_cluster.dashboard and meta["job"]["id"].startswith("r1v-submitted-")
    res = r1v("status", str(run_dir))
    assert res.returncode == 0 and f"job {meta['job']['id']} on {local_cluster.dashboard}: SUCCEEDED" in res.stdout
    counts = json.loads((run_dir / "stages" / "sft" / "epoch-0-counts.json").read_text())
    assert counts["rows_in"] == 61

    # placement: the trainers ran on worker nodes, never on the head (which has no CPUs)
    from ray.util.state import list_actors, list_nodes

    nodes = {n.node_id: n.resources_total for n in list_nodes(address=local_cluster.dashboard)}
    trainers = list_actors(address=local_cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")],
                           detail=True, limit=1000)
    assert len(trainers) >= 2
    assert all("worker" in nodes[a.node_id] and "head" not in nodes[a.node_id] for a in trainers)

    client = MlflowClient(tracking_server.uri)
    child = client.get_run(runner.state("sft")["mlflow_run_id"])
    assert child.info.status == "FINISHED" and client.get_metric_history(child.info.run_id, "loss")
    print(f"submit to done: {time.monotonic() - t0:.1f} s")


def test_a_bad_config_submits_nothing(local_cluster, tmp_path, capsys):
    wf = _workflow(tmp_path, "http://127.0.0.1:1")
    res = r1v("submit", str(wf), "stages.sft.config.bogus=1", "--address", local_cluster.dashboard)
    assert res.returncode == 2 and "stages.sft.config.bogus" in res.stderr
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(local_cluster.dashboard).list_jobs()
    assert not [j for j in jobs if (j.metadata or {}).get("r1v.run_dir", "").startswith(str(tmp_path))]
