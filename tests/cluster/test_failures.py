"""Stages survive their workers, and a stopped job resumes: on the head + two workers cluster (127.0.0.1).

- A Ray Train worker killed (SIGKILL, by pid) mid-SFT: Ray Train restarts the worker group from the latest
  checkpoint by itself; the stage ends `done` in its first attempt, and every row of the epoch is trained exactly
  once in the final accounting (the work after the last checkpoint is redone, not counted twice).
- The submitted job stopped mid-stage (`r1v stop`): the run reads `interrupted`; `r1v resume --address` finishes it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.conftest import r1v
from r1v.workflow.runner import Runner, read_events

WORKFLOW = """
name: survive
run_root: {root}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 61, n_test: 4, corrupt_rows: 1}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 2,
             keep_checkpoints: 3, optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 2, cpus_per_worker: 1}}}}
"""


def _submit(tmp_path: Path, local_cluster, capsys) -> Path:
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(root=tmp_path / "shared"))
    res = r1v("submit", str(wf), "--address", local_cluster.dashboard)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    return Path(next(line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("r1v: run ")))


def _wait(cond, what: str, run_dir: Path | None = None, local_cluster=None, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not cond():
        if run_dir is not None and _job(run_dir) and _job_status(local_cluster, _job(run_dir)["id"]) in TERMINAL:
            logs = "".join(p.read_text()[-2000:] for p in (run_dir / "logs").glob("*.log"))
            raise AssertionError(f"the job ended before {what}: {logs}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.5)


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _job(run_dir: Path) -> dict:
    p = run_dir / "run.json"
    return json.loads(p.read_text()).get("job", {}) if p.exists() else {}


def _job_status(local_cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(local_cluster.dashboard).get_job_status(job_id)).split(".")[-1]


def _checkpoint(run_dir: Path, step: int) -> bool:
    return bool(list((run_dir / "stages" / "sft" / "ray" / "train").glob(f"step-{step:06d}")))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_trainer_is_replaced_and_the_stage_finishes_by_itself(local_cluster, tmp_path, capsys):
    run_dir = _submit(tmp_path, local_cluster, capsys)
    _wait(lambda: _checkpoint(run_dir, 4), "a checkpoint at step 4", run_dir, local_cluster)
    from ray.util.state import list_actors

    trainers = [a for a in list_actors(address=local_cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                                           ("state", "=", "ALIVE")], detail=True)]
    assert trainers, "no live trainer"
    t_kill = time.monotonic()
    os.kill(trainers[0].pid, signal.SIGKILL)
    job = _job(run_dir)["id"]
    _wait(lambda: _job_status(local_cluster, job) in TERMINAL, "the job's end")
    assert _job_status(local_cluster, job) == "SUCCEEDED"
    print(f"kill to job end: {time.monotonic() - t_kill:.1f} s")
    runner = Runner.open(run_dir)
    st = runner.state("sft")
    assert st["status"] == "done" and st["attempts"] == 1  # no second command, no second attempt
    assert [e["event"] for e in read_events(run_dir) if e["stage"] == "sft"] == ["started", "finished"]
    counts = json.loads((run_dir / "stages" / "sft" / "epoch-0-counts.json").read_text())
    assert counts["rows_in"] == 61 == counts["rows_trained"] + counts["rows_quarantined"]
    rows = pq.read_table(run_dir / "stages" / "sft" / "epoch-0-rows.parquet").column("row").to_pylist()
    assert sorted(rows) == list(range(61))  # each row of the epoch once: nothing skipped, nothing twice


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_stopped_job_reads_interrupted_and_resume_address_finishes_it(local_cluster, tmp_path, capsys):
    run_dir = _submit(tmp_path, local_cluster, capsys)
    _wait(lambda: _checkpoint(run_dir, 2), "a checkpoint at step 2", run_dir, local_cluster)
    assert r1v("stop", str(run_dir)).returncode == 0
    res = r1v("status", str(run_dir))
    assert res.returncode == 0
    assert "sft" in res.stdout and " interrupted " in res.stdout and "STOPPED" in res.stdout, res.stdout
    res = r1v("resume", str(run_dir), "--address", local_cluster.dashboard, "--follow")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    runner = Runner.open(run_dir)
    assert [r["status"] for r in runner.status_rows()] == ["done"] * 3
    assert runner.state("sft")["attempts"] == 2
    assert len(json.loads((run_dir / "run.json").read_text())["jobs"]) == 2
