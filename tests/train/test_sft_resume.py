"""Kill a running workflow mid-SFT (SIGKILL to the driver's process group), then `r1v resume` it.

Asserts on what ran: finished stages are skipped, the SFT stage restarts from its last checkpoint (not from
step 0) on both ranks, and the epoch trains every row exactly once with counts that reconcile (an odd row count
also checks that the shards stay within one row of each other and that no row is dropped).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from r1v.cli import main
from r1v.workflow.runner import Runner, read_events

WORKFLOW = """
name: killme
run_root: {root}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 41, n_test: 4, corrupt_rows: 3}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 2,
             keep_checkpoints: 5, optim: {{lr: 1.0e-3}}}}
"""


@pytest.mark.slow
def test_killed_sft_resumes_from_checkpoint(ray_cluster, tmp_path):
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(root=tmp_path))
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "r1v.cli", "run", str(wf), "--run-dir", str(run_dir)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "first.log", "w"))
    ckpts = run_dir / "stages" / "sft" / "ray" / "train"
    deadline = time.time() + 300
    # Ray registers a checkpoint only once every rank's shard is in (a half-written one must never be resumed
    # from), a little after its folder appears: by step 6's folder, earlier checkpoints are registered. Step 6 of
    # 11: the rows left at the resume (at least 17) give both ranks some.
    while time.time() < deadline and not list(ckpts.glob("step-000006")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    assert list(ckpts.glob("step-000006")), "no checkpoint appeared in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    runner = Runner.open(run_dir)
    assert runner.state("sft")["status"] == "running"  # killed: no chance to record anything
    assert not (run_dir / "stages" / "sft" / "model").exists()
    before = {s: runner.state(s)["started_at"] for s in ("data", "models")}
    n_events = len(read_events(run_dir))

    assert main(["resume", str(run_dir)]) == 0
    runner = Runner.open(run_dir)
    resumed = [(e["stage"], e["event"]) for e in read_events(run_dir)[n_events:]]
    assert resumed[:2] == [("data", "skipped"), ("models", "skipped")]
    assert ("sft", "started") in resumed and resumed[-1] == ("sft", "finished")
    assert {s: runner.state(s)["started_at"] for s in ("data", "models")} == before
    assert runner.state("sft")["attempts"] == 2

    child = MlflowClient(runner.meta["tracking_uri"]).get_run(runner.state("sft")["mlflow_run_id"])
    assert child.info.status == "FINISHED"
    # Resumed from a registered checkpoint, not step 0. Ray's controller records checkpoints a little after the
    # folders appear, so the newest one it had recorded at the kill may be an earlier one.
    assert 2 <= int(child.data.tags["r1v.resumed_from_step"]) <= 6
    counts = json.loads((run_dir / "stages" / "sft" / "epoch-0-counts.json").read_text())
    assert counts["rows_in"] == counts["rows_distinct"] == 41
    assert counts["rows_quarantined"] == 3 and counts["rows_trained"] == 38
    rows = pq.read_table(run_dir / "stages" / "sft" / "epoch-0-rows.parquet").to_pydict()
    assert sorted(rows["row"]) == list(range(41))  # every row once, across the kill
    for segment in (0, 1):  # before the kill and after the resume, both ranks took rows, within one of each other
        ranks = [r for r, s in zip(rows["rank"], rows["segment"], strict=True) if s == segment]
        assert abs(ranks.count(0) - ranks.count(1)) <= 1 and ranks.count(1) > 0, (segment, ranks)
    assert (run_dir / "stages" / "sft" / "model" / "config.json").exists()
