"""A workflow logs to an MLflow tracking server (artifacts proxied), and a server that stops mid-stage does not
fail the stage: its metrics are buffered, sent once the server is back, and the failures are counted."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from r1v_test_kinds import wait_for
from r1v_test_servers import MlflowServer

from r1v.workflow import tracking
from r1v.workflow.runner import Runner
from r1v.workflow.schema import load_workflow


@pytest.fixture
def server(tmp_path):
    """A server of the test's own, which it stops and starts again."""
    s = MlflowServer(tmp_path / "mlflow").start()
    yield s
    s.stop()


WF = """
name: tracked
run_root: {root}
tracking: {{tracking_uri: "{uri}", experiment: served}}
stages:
  first: {{kind: test.metrics, config: {{steps: {steps}, pause_at: {pause}, gate_dir: "{gates}"}}}}
  second: {{kind: test.metrics, needs: [first], config: {{steps: 3}}}}
"""


def _workflow(tmp_path: Path, uri: str, steps: int = 5, pause: list[int] | None = None) -> Path:
    p = tmp_path / "wf.yaml"
    (tmp_path / "gates").mkdir(exist_ok=True)
    p.write_text(WF.format(root=tmp_path / "runs", uri=uri, steps=steps, pause=pause or [], gates=tmp_path / "gates"))
    return p


def test_a_workflow_logs_runs_metrics_and_artifacts_to_a_tracking_server(tmp_path, tracking_server):
    server = tracking_server  # the session's: this test leaves it running
    r = Runner.create(load_workflow(_workflow(tmp_path, server.uri)), tmp_path / "runs" / "r")
    assert r.run() == {"first": "ran", "second": "ran"}
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("served")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    parent = client.get_run(r.meta["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["stages.first.kind"] == "test.metrics"
    children = {c.info.run_name: c for c in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == {"first", "second"}
    history = client.get_metric_history(children["first"].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    local = client.download_artifacts(children["first"].info.run_id, "notes/hello.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello from the stage\n"
    # the artifacts are on the server's side, not under the run root
    run_id = children["first"].info.run_id
    assert list((server.root / "artifacts").glob(f"**/{run_id}/artifacts/notes/hello.txt"))
    assert not (tmp_path / "runs" / "mlartifacts").exists()
    # docs/watching.md through the server: the experiment's kind, the description, a table replaced in place
    assert exp.tags[tracking.KIND_TAG] == tracking.TRAINING_KIND
    assert f"r1v resume {r.run_dir}" in parent.data.tags[tracking.NOTE_TAG]
    log = tracking.RunLogger(server.uri, parent.info.run_id)
    for acc in (0.25, 0.5):  # MLflow's log_table appends to a table of the same name: replace deletes it first
        log.table([{"row": "sft", "accuracy": acc}], "results/table.json", replace=True)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "results/table.json",
                                                      str(tmp_path / "t"))).read_text())
    assert table["data"] == [["sft", 0.5]] and log.failures == 0


def test_a_server_that_stops_mid_stage_does_not_fail_it(tmp_path, server, monkeypatch):
    monkeypatch.setattr(tracking.RunLogger, "RETRY_S", 0.5)
    gates = tmp_path / "gates"
    r = Runner.create(load_workflow(_workflow(tmp_path, server.uri, steps=30, pause=[10, 20])),
                      tmp_path / "runs" / "r")
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(what=r.run()), daemon=True)
    t.start()
    wait_for(gates / "at-10")
    server.stop()  # steps 10-19 are logged while the server is down
    (gates / "go-10").write_text("")
    wait_for(gates / "at-20")
    server.start()  # back: the buffered steps go out with the next ones
    (gates / "go-20").write_text("")
    t.join(120)
    assert result.get("what") == {"first": "ran", "second": "ran"}
    st = r.state("first")
    assert st["status"] == "done" and st["tracking_failures"] >= 1
    client = MlflowClient(server.uri)
    run_id = st["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(30))  # nothing lost
    assert client.get_metric_history(run_id, "tracking_failures")[-1].value >= 1
