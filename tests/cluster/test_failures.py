"""Submitted jobs on the head + two workers cluster (127.0.0.1): stages survive their workers, a stopped job resumes.

- `r1v submit --follow` runs a workflow with its run root on a path every node sees and MLflow on a tracking server;
  the trainers run on worker nodes, `status` names the job, MLflow holds the stage's run and metrics. In it a Ray
  Train worker is killed (SIGKILL, by pid) mid-SFT: Ray Train restarts the worker group from the latest
  checkpoint by itself; the stage ends `done` in its first attempt, and every row of the epoch is trained exactly
  once in the final accounting (the work after the last checkpoint is redone, not counted twice). What is lost is
  at most one checkpoint interval: the restart resumes from the newest checkpoint on disk at the kill.
- A worker node removed mid-SFT (its raylet and every process on it killed at once), on a cluster of the test's own:
  the worker group restarts on the remaining node (2 trainers of 1 CPU and the Ray Data tasks that feed them fit on
  its 3 CPUs), with the same accounting.
- The submitted job stopped mid-stage (`r1v stop`): the run reads `interrupted`; `r1v resume --address` finishes it
  from a checkpoint, every row of the epoch trained once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from cluster.conftest import r1v, r1v_env
from r1v.workflow.runner import Runner, read_events

WORKFLOW = """
name: survive
run_root: {root}
tracking: {{tracking_uri: "{uri}", experiment: cluster}}
stages:
  sft:
    kind: sft
    config: {{model: "{model}", corpus: "{train}", batch_size: 2, checkpoint_every: {every},
             keep_checkpoints: 3, optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 2, cpus_per_worker: 1}}}}
"""


def _workflow(tmp_path: Path, tracking_server, assets: dict[str, str], every: int = 4) -> Path:
    wf = tmp_path / "wf.yaml"  # outside the checkout: submit ships it in the package
    wf.write_text(WORKFLOW.format(root=tmp_path / "shared", uri=tracking_server.uri, every=every,
                                  model=assets["model"], train=assets["train"]))
    return wf


def _submit(wf: Path, local_cluster) -> Path:
    res = r1v("submit", str(wf), "--address", local_cluster.dashboard)
    assert res.returncode == 0, res.stderr[-3000:]
    return _run_dir(res.stdout)


def _run_dir(out: str) -> Path:
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


def _latest_checkpoint(run_dir: Path) -> int:
    return max(int(p.name.split("-")[1]) for p in (run_dir / "stages" / "sft" / "ray" / "train").glob("step-*"))


def _losses(run_dir: Path) -> tuple[list[tuple[int, float]], str | None]:
    """The SFT stage's loss history in MLflow as (step, wall time s) in log order, and the step its last restart
    resumed from (the tag rank 0 sets on restoring a checkpoint). Ray Train's workers log to files on their own
    nodes, not to the job's output: MLflow is where their progress shows."""
    from mlflow.tracking import MlflowClient

    meta = json.loads((run_dir / "run.json").read_text())
    run_id = Runner.open(run_dir).state("sft")["mlflow_run_id"]
    c = MlflowClient(meta["tracking_uri"])
    hist = sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)
    return [(m.step, m.timestamp / 1000) for m in hist], c.get_run(run_id).data.tags.get("r1v.resumed_from_step")


def _ray_job(local_cluster, run_dir: Path) -> str:
    """The Ray job id (what the state API filters by) of the run's submitted job."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(local_cluster.dashboard).get_job_info(_job(run_dir)["id"]).job_id


def _trainers(local_cluster, run_dir: Path) -> list:
    """The run's live Ray Train workers (other tests' jobs share the cluster)."""
    from ray.util.state import list_actors

    return list_actors(address=local_cluster.dashboard, detail=True, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", _ray_job(local_cluster,
                                                                                                 run_dir))])


def _survives(run_dir: Path, local_cluster, kill, ended=lambda: False) -> dict[str, float]:
    """Wait for the checkpoint at step 4, `kill()`, then follow the job to its end; asserts what a stage that
    survives must show (done in one attempt, every row once, at most one interval lost) and returns figures.
    `ended()`: whether what follows the job has ended (then no checkpoint is coming)."""
    def ready() -> bool:
        if ended():
            raise AssertionError(f"the job ended before its step-4 checkpoint (run {run_dir})")
        return _checkpoint(run_dir, 4)

    _wait(ready, "a checkpoint at step 4", run_dir, local_cluster)
    at_kill = _latest_checkpoint(run_dir)
    t_kill = time.time()
    kill()
    job = _job(run_dir)["id"]
    _wait(lambda: _job_status(local_cluster, job) in TERMINAL, "the job's end")
    assert _job_status(local_cluster, job) == "SUCCEEDED"
    runner = Runner.open(run_dir)
    st = runner.state("sft")
    assert st["status"] == "done" and st["attempts"] == 1  # no second command, no second attempt
    assert [e["event"] for e in read_events(run_dir) if e["stage"] == "sft"] == ["started", "finished"]
    losses, resumed = _losses(run_dir)
    from ray.util.state import list_actors

    groups = list_actors(address=local_cluster.dashboard, limit=1000, filters=[
        ("class_name", "=", "RayTrainWorker"), ("job_id", "=", _ray_job(local_cluster, run_dir))])
    assert len(groups) >= 4, "the worker group was not replaced"  # two groups of two: the first, its replacement
    steps = [s for s, _ in losses]
    # The tag is best effort (a slow server loses it); the metrics are buffered and sent again. The restarted
    # group logs again from the step after its checkpoint: the first step that goes back.
    back = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    if resumed is None:
        resumed = str(back[0] - 1) if back else str(at_kill)  # no step logged twice: nothing was redone
    # A checkpoint counts once written: the restart takes the newest one on disk at the kill (or one written after
    # it, before the group stopped), so at most the steps of one checkpoint interval (4) are trained twice: all
    # four when the kill lands after the interval's last step but before its checkpoint is complete.
    assert int(resumed) >= at_kill, (resumed, at_kill)
    redone = sorted({s for s in steps if steps.count(s) > 1})
    assert len(redone) <= 4 and all(s > int(resumed) for s in redone), (resumed, redone)
    assert sorted(set(steps)) == list(range(1, max(steps) + 1))  # every step logged, none skipped
    counts = json.loads((run_dir / "stages" / "sft" / "epoch-0-counts.json").read_text())
    # what an unkilled run of this corpus counts: 41 rows in, the one corrupt row quarantined, 40 trained
    assert (counts["rows_in"], counts["rows_trained"], counts["rows_quarantined"]) == (41, 40, 1), counts
    rows = pq.read_table(run_dir / "stages" / "sft" / "epoch-0-rows.parquet").column("row").to_pylist()
    assert sorted(rows) == list(range(41))  # each row of the epoch once: nothing skipped, nothing twice
    # the restarted group's first step: the last time the step after the one it resumed from was logged (the
    # surviving ranks may log a step or two more between the kill and the group's end)
    again = max(t for s, t in losses if s == int(resumed) + 1)
    return {"kill_to_training_again_s": round(again - t_kill, 1), "resumed_from_step": int(resumed),
            "newest_checkpoint_at_kill": at_kill, "steps_trained_twice": len(redone)}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_submitted_run_on_worker_nodes_survives_a_killed_trainer(local_cluster, tracking_server, cluster_assets,
                                                                    tmp_path):
    wf = _workflow(tmp_path, tracking_server, cluster_assets)
    t0 = time.monotonic()
    log = tmp_path / "follow.log"
    with log.open("w") as f:
        follow = subprocess.Popen([sys.executable, "-m", "r1v.cli", "submit", str(wf), "--address",
                                   local_cluster.dashboard, "--follow"], stdout=f, stderr=subprocess.STDOUT,
                                  text=True, env=r1v_env())
    _wait(lambda: "r1v: run " in log.read_text() or follow.poll() is not None, "the submission")
    run_dir = _run_dir(log.read_text())
    assert run_dir.parent == tmp_path / "shared"

    def kill() -> None:
        trainers = _trainers(local_cluster, run_dir)
        assert trainers, "no live trainer"
        os.kill(trainers[0].pid, signal.SIGKILL)

    figures = _survives(run_dir, local_cluster, kill, ended=lambda: follow.poll() is not None)
    assert follow.wait(timeout=300) == 0, log.read_text()[-4000:]  # --follow exits with the job's status
    print(f"killed trainer: {figures}; submit to done {time.monotonic() - t0:.1f} s")

    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["job"]["address"] == local_cluster.dashboard and meta["job"]["id"].startswith("r1v-survive-")
    res = r1v("status", str(run_dir))
    assert res.returncode == 0 and f"job {meta['job']['id']} on {local_cluster.dashboard}: SUCCEEDED" in res.stdout
    # placement: the trainers ran on worker nodes, never on the head (which has no CPUs)
    from ray.util.state import list_actors, list_nodes

    nodes = {n.node_id: n.resources_total for n in list_nodes(address=local_cluster.dashboard)}
    from ray.job_submission import JobSubmissionClient

    ray_job = JobSubmissionClient(local_cluster.dashboard).get_job_info(meta["job"]["id"]).job_id
    trainers = list_actors(address=local_cluster.dashboard, detail=True, limit=1000,
                           filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job)])
    assert len(trainers) >= 4  # two groups of two: the first and the one that replaced it
    assert all("worker" in nodes[a.node_id] and "head" not in nodes[a.node_id] for a in trainers)
    # MLflow on the tracking server: the stage's run, finished, with its metrics and its artifacts
    client = MlflowClient(tracking_server.uri)
    child = client.get_run(Runner.open(run_dir).state("sft")["mlflow_run_id"])
    assert child.info.status == "FINISHED" and client.get_metric_history(child.info.run_id, "rows_trained")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_removed_worker_node_and_the_stage_goes_on_on_the_rest(own_cluster, tracking_server, cluster_assets,
                                                                  tmp_path):
    local_cluster = own_cluster
    run_dir = _submit(_workflow(tmp_path, tracking_server, cluster_assets), local_cluster)
    removed: list[int] = []

    def kill() -> None:
        node_ids = {t.node_id for t in _trainers(local_cluster, run_dir)}
        workers = [n for n in local_cluster.nodes() if n["raylet"]["nodeId"] in node_ids
                   and n["raylet"]["state"] == "ALIVE"]
        worker = next(int(k[len("worker"):]) for n in workers for k in n["raylet"]["resourcesTotal"]
                      if k.startswith("worker") and k != "worker")
        local_cluster.control("remove", worker)
        removed.append(worker)

    figures = _survives(run_dir, local_cluster, kill)
    print(f"removed node: {figures}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_stopped_job_reads_interrupted_and_resume_address_finishes_it(local_cluster, tracking_server,
                                                                        cluster_assets, tmp_path):
    """Stopped after its step-2 checkpoint (of 50 steps: the stop takes seconds, in which training goes on), the
    run reads `interrupted`; the resumed job, its checkpoint cadence changed (an operational field: 2 steps was for
    the stop), restarts SFT from a checkpoint (not step 0), and the epoch trains every row once across the stop, on
    both ranks."""
    assets = cluster_assets | {"train": cluster_assets["train_long"]}
    run_dir = _submit(_workflow(tmp_path, tracking_server, assets, every=2), local_cluster)
    _wait(lambda: _checkpoint(run_dir, 2), "a checkpoint at step 2", run_dir, local_cluster)
    assert r1v("stop", str(run_dir)).returncode == 0
    res = r1v("status", str(run_dir))
    assert res.returncode == 0
    assert "sft" in res.stdout and " interrupted " in res.stdout and "STOPPED" in res.stdout, res.stdout
    assert not (run_dir / "stages" / "sft" / "model").exists()
    res = r1v("resume", str(run_dir), "stages.sft.config.checkpoint_every=100", "--address", local_cluster.dashboard,
              "--follow")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    runner = Runner.open(run_dir)
    assert [r["status"] for r in runner.status_rows()] == ["done"]
    assert runner.state("sft")["attempts"] == 2
    assert len(json.loads((run_dir / "run.json").read_text())["jobs"]) == 2
    losses, resumed = _losses(run_dir)
    steps = [s for s, _ in losses]
    back = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    if resumed is None:  # the tag is best effort: the resumed run logs again from the step after its checkpoint
        resumed = str(back[0] - 1) if back else str(max(steps))  # no step logged twice: nothing was redone
    assert int(resumed) >= 2, (resumed, steps)  # from a checkpoint, not from step 0
    counts = json.loads((run_dir / "stages" / "sft" / "epoch-0-counts.json").read_text())
    assert (counts["rows_in"], counts["rows_trained"], counts["rows_quarantined"]) == (201, 200, 1), counts
    rows = pq.read_table(run_dir / "stages" / "sft" / "epoch-0-rows.parquet").to_pydict()
    assert sorted(rows["row"]) == list(range(201))  # every row once, across the stop
    for segment in (0, 1):  # before the stop and after the resume, both ranks took rows, within one of each other
        ranks = [r for r, g in zip(rows["rank"], rows["segment"], strict=True) if g == segment]
        assert abs(ranks.count(0) - ranks.count(1)) <= 1 and ranks.count(1) > 0, (segment, ranks)
    assert (run_dir / "stages" / "sft" / "model" / "config.json").exists()
