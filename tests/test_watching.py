"""Watching a run as a user does: progress of a running stage on the console, in `r1v status` (read from the
run's files, by another process) and in MLflow; and the MLflow side (experiment kind, descriptions, every
stage's params, metrics and artifacts, sample tables with images, the results table).

One tiny workflow of test kinds (`test.progress`, tests/plugins/r1v_test_kinds.py) run by `r1v run` in a child
process, paused at a known step while the test reads its status."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from r1v_test_kinds import wait_for

from r1v.cli import main
from r1v.workflow import progress, tracking
from r1v.workflow.console import Console
from r1v.workflow.runner import Runner

PLUGINS = Path(__file__).resolve().parent / "plugins"

WF = """
name: watch
run_root: {root}
tracking: {{tracking_uri: "{uri}"}}
stages:
  train: {{kind: test.progress, config: {{steps: 6, pause_at: 3, gate_dir: "{gate}"}}}}
  evaluate: {{kind: test.progress, needs: [train], config: {{steps: 2}}}}
"""


def _table(client: MlflowClient, run_id: str, path: str) -> dict[str, list]:
    """A table artifact as {column: values} (`MlflowClient.load_table` searches runs through the global tracking
    URI, not the client's)."""
    with tempfile.TemporaryDirectory() as d:
        data = json.loads(Path(client.download_artifacts(run_id, path, d)).read_text())
    return {c: [row[i] for row in data["data"]] for i, c in enumerate(data["columns"])}


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> dict:
    """`r1v run` of the workflow in a child; while `train` waits at step 3: `r1v status` (this process) and the
    child's console output. Returns what was seen, after the run ended."""
    tmp = tmp_path_factory.mktemp("watch")
    gate = tmp / "gate"
    gate.mkdir()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    wf = tmp / "wf.yaml"
    wf.write_text(WF.format(root=tmp / "runs", uri=uri, gate=gate))
    run = tmp / "runs" / "r"
    console = tmp / "console.txt"
    code = "import sys, r1v_test_kinds; from r1v.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
           progress.EVERY_ENV: "0", "R1V_TEST_PROGRESS_LINE_S": "0.5"}
    with open(console, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", code, "run", str(wf), "--run-dir", str(run)], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
    seen: dict = {"run": run, "uri": uri}
    try:
        wait_for(gate / "at-3", 120)
        seen["rows"] = Runner.open(run).status_rows()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["status", str(run)]) == 0
        seen["status"] = buf.getvalue()
        t0 = time.monotonic()
        while "step 3/6" not in console.read_text() and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        seen["console_while_running"] = console.read_text()
        (gate / "go-3").write_text("")
        assert child.wait(120) == 0, console.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    seen["console"] = console.read_text()
    return seen


def test_status_shows_the_running_stage_progress(watched):
    row = {r["stage"]: r for r in watched["rows"]}
    assert row["train"]["status"] == "running"
    assert row["train"]["progress"].startswith("step 3/6 (50%), loss 0.3333")
    assert "ETA" in row["train"]["progress"] and "step/s" in row["train"]["progress"]
    assert row["train"]["seconds"] is not None  # elapsed so far
    assert row["evaluate"]["status"] == "pending" and row["evaluate"]["progress"] == ""
    line = next(s for s in watched["status"].splitlines() if s.startswith("train "))
    assert " running " in line and "step 3/6 (50%), loss 0.3333" in line, watched["status"]
    assert "error / why / progress" in watched["status"]


def test_the_console_shows_progress_while_a_stage_runs(watched):
    text = watched["console_while_running"]
    assert "[1/2] train (test.progress) ..." in text
    assert any("step 3/6 (50%), loss 0.3333" in s for s in text.splitlines() if s.startswith("      ")), text
    assert "train (test.progress) ... done in" in watched["console"]


def test_progress_is_in_mlflow_and_the_parent_has_each_stage_curve(watched):
    runner = Runner.open(watched["run"])
    client = MlflowClient(watched["uri"])
    child = runner.state("train")["mlflow_run_id"]
    steps = [m.value for m in client.get_metric_history(child, "progress/step")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert client.get_metric_history(child, "progress/fraction")[-1].value == 1.0
    assert [m.step for m in client.get_metric_history(child, "progress/loss")] == [1, 2, 3, 4, 5, 6]
    assert {"progress/rate", "progress/eta_s"} <= set(client.get_run(child).data.metrics)
    parent = runner.meta["parent_run_id"]
    assert [(m.step, round(m.value, 4)) for m in client.get_metric_history(parent, "train/loss")] == [
        (s, round(1 / s, 4)) for s in range(1, 7)]
    assert len(client.get_metric_history(parent, "evaluate/loss")) == 2
    done = progress.read(runner.stage_dir("train"))
    assert done["step"] == done["total"] == 6


def test_mlflow_shows_the_experiment_runs_descriptions_and_sample_tables(watched):
    runner = Runner.open(watched["run"])
    client = MlflowClient(watched["uri"])
    exp = client.get_experiment(runner.meta["experiment_id"])
    assert exp.tags[tracking.KIND_TAG] == tracking.TRAINING_KIND
    # MLflow 3.17's UI ignores that tag: the link the run prints opens its model-training view
    page = f"#/experiments/{exp.experiment_id}/runs/{runner.meta['parent_run_id']}?workflowType=machine_learning"
    assert f"r1v: MLflow: `mlflow ui --backend-store-uri {watched['uri']} " in watched["console"], watched["console"]
    assert page in watched["console"]
    parent = client.get_run(runner.meta["parent_run_id"])
    note = parent.data.tags[tracking.NOTE_TAG]
    assert f"r1v resume {runner.run_dir}" in note and "`train` (test.progress)" in note
    assert parent.data.params  # the workflow, flattened
    for name in ("train", "evaluate"):
        run_id = runner.state(name)["mlflow_run_id"]
        r = client.get_run(run_id)
        assert r.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        assert f"r1v resume {runner.run_dir}" in r.data.tags[tracking.NOTE_TAG]
        assert r.data.params["steps"] in ("6", "2")
        assert {"stage_seconds", "loss", "progress/step"} <= set(r.data.metrics)
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "samples"} <= names, names
        steps = int(r.data.params["steps"])
        table = f"samples/step-{steps:05d}.json"
        assert {"path": table, "type": "table"} in json.loads(r.data.tags["mlflow.loggedArtifacts"])
        df = _table(client, run_id, table)
        assert list(df["id"]) == ["row0", "row1", "row2", "row3"]
        assert all(cell["type"] == "image" for cell in df["image"])  # rows without an image: a placeholder
        images = {a.path for a in client.list_artifacts(run_id, f"table_images/samples/step-{steps:05d}")}
        assert len(images) == 8  # an image and its compressed copy per row


def test_the_results_table_is_a_table_on_the_parent_run_replaced_on_each_report(watched):
    from r1v.eval.results import TABLE_ARTIFACT, log_results

    runner = Runner.open(watched["run"])
    client = MlflowClient(watched["uri"])
    results = {"stages": [{"stage": "train", "accuracy": 0.5, "stderr": 0.1, "n": 8, "eval_stage": "evaluate"}],
               "baselines": {"no_image": {"accuracy": 0.25, "stderr": 0.1, "n": 8, "eval_stage": "evaluate"}}}
    for _ in range(2):  # a resumed run reports again: the table is replaced, not appended to
        log_results(runner.run_dir, results, [])
    df = _table(client, runner.meta["parent_run_id"], TABLE_ARTIFACT)
    assert list(df["row"]) == ["train", "baseline: no_image"]
    assert list(df["accuracy"]) == [0.5, 0.25]


def test_the_terminal_stage_line_shows_progress():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    Console.WATCH_S, old = 0.1, Console.WATCH_S
    try:
        with Console(False, stream=out) as con, con.stage("sft", "sft", 1, 1,
                                                          watch=lambda: "step 40/100 (40%), loss 0.51"):
            time.sleep(1.5)
    finally:
        Console.WATCH_S = old
    assert re.search(r"\r\x1b\[2K\[1/1\] sft \(sft\) \.\.\. \ds  step 40/100 \(40%\), loss 0.51", out.getvalue())


def test_progress_writes_at_most_every_interval_and_always_the_last_step(tmp_path):
    p = progress.Progress(tmp_path, every_s=3600)
    assert p.update(1, 4, loss=2.0)  # the first
    assert not p.update(2, 4, loss=1.0)
    assert progress.read(tmp_path)["step"] == 1
    assert p.update(4, 4, loss=0.5)  # the last
    got = progress.read(tmp_path)
    assert (got["step"], got["metrics"], got["eta_s"]) == (4, {"loss": 0.5}, 0.0)
    assert progress.describe({"step": 30, "total": 120, "metrics": {"reward": 0.25}, "rate": 0.1, "eta_s": 900,
                              "time": 0}, now=10) == "step 30/120 (25%), reward 0.25, 10 s/step, ETA 14m50s"
    assert progress.describe({"step": 5, "total": None, "unit": "batch", "metrics": {}, "rate": 2.5, "time": 0},
                             now=7200) == "batch 5, 2.5 batch/s (updated 2h00m ago)"
    progress.clear(tmp_path)
    assert progress.read(tmp_path) is None


def test_flush_writes_the_update_the_interval_held_back(tmp_path):
    p = progress.Progress(tmp_path, every_s=3600)
    p.update(1, 10, loss=2.0)
    p.update(7, 10, loss=0.5)  # an estimated total the loop never reaches
    assert progress.read(tmp_path)["step"] == 1
    p.flush()
    got = progress.read(tmp_path)
    assert (got["step"], got["metrics"]) == (7, {"loss": 0.5})
