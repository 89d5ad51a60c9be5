"""What running on a cluster costs: submission overhead and what a killed trainer costs, on a local cluster.

    python bench/cluster_overhead.py [--repeats 2]

Starts a Ray cluster of a head and two worker nodes on 127.0.0.1 (`tests/cluster/local_cluster.py`, the test
suite's), and runs one small workflow (synthetic data, tiny models, a 2-worker SFT of 61 rows, checkpoints every 4
steps) three ways, `--repeats` times each:

- local: `r1v run` on this machine (its own local Ray), the baseline;
- submitted: `r1v submit --follow` to the cluster;
- killed: submitted, and one Ray Train worker SIGKILLed 1 s after the step-4 checkpoint appears.

Prints per run: command to first stage running (the first `started` event in the run's events.jsonl), command to
the SFT stage running, command to the end; for the killed runs, kill to training again (the restarted worker
group's first step logged to MLflow), the step it resumed from, and the steps lost (the steps logged to MLflow
twice: trained before the kill, trained again after it). Times are medians over the repeats; submission overhead
is stated as the difference to the local baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "plugins"))

WORKFLOW = """
name: overhead
run_root: {root}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 61, n_test: 4, corrupt_rows: 1}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 4,
             keep_checkpoints: 3, optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 2, cpus_per_worker: 1}}}}
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _events(run_dir: Path) -> list[dict]:
    p = run_dir / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _started(run_dir: Path | None, stage: str | None = None) -> bool:
    return run_dir is not None and any(e["event"] == "started" and (stage is None or e["stage"] == stage)
                                       for e in _events(run_dir))


def _run_dir(out: str) -> Path | None:
    for line in out.splitlines():
        if line.startswith("r1v: run "):
            return Path(line.split(" ", 2)[2].strip())
    return None


def _follow(cmd: list[str], root: Path, on_tick=None) -> dict[str, float]:
    """Run `cmd`, polling the run it creates; the times (s) from the start to the first stage, to SFT, to the end."""
    t0 = time.monotonic()
    log = root / "cmd.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), text=True)
    marks: dict[str, float] = {}
    run_dir = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if run_dir is None:
            run_dir = _run_dir(log.read_text()) or next(iter(sorted((root / "runs").glob("overhead-*"))), None)
        if run_dir is not None:
            if "first_stage" not in marks and _started(run_dir):
                marks["first_stage"] = now
            if "sft" not in marks and _started(run_dir, "sft"):
                marks["sft"] = now
            if on_tick is not None:
                on_tick(run_dir, marks)
        time.sleep(0.2)
    marks["end"] = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
    marks["run_dir"] = run_dir  # type: ignore[assignment]
    return marks


def _losses(run_dir: Path) -> tuple[list[tuple[int, float]], str | None]:
    """The SFT stage's loss history in MLflow, (step, wall time s) in log order, and the step its restart resumed
    from (rank 0's tag). Ray Train's workers log to files on their own nodes; MLflow is where progress shows."""
    from mlflow.tracking import MlflowClient

    meta = json.loads((run_dir / "run.json").read_text())
    state = json.loads((run_dir / "stages" / "sft" / "state.json").read_text())
    c = MlflowClient(meta["tracking_uri"])
    hist = sorted(c.get_metric_history(state["mlflow_run_id"], "loss"), key=lambda m: m.timestamp)
    return ([(m.step, m.timestamp / 1000) for m in hist],
            c.get_run(state["mlflow_run_id"]).data.tags.get("r1v.resumed_from_step"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ["RAY_AUTH_MODE"] = "token"
    from cluster.conftest import LocalCluster
    from ray.util.state import list_actors

    base = Path(tempfile.mkdtemp(prefix="r1vb-", dir="/tmp"))
    cluster = LocalCluster(base / "c")
    (base / "c").mkdir()
    rows: dict[str, list[dict]] = {"local": [], "submitted": [], "killed": []}
    try:
        print("starting a head and two worker nodes on 127.0.0.1 ...", flush=True)
        cluster.start()
        for rep in range(args.repeats):
            for mode in ("local", "submitted", "killed"):
                root = base / f"{mode}-{rep}"
                root.mkdir()
                wf = root / "wf.yaml"
                wf.write_text(WORKFLOW.format(root=root / "runs"))
                cli = [sys.executable, "-m", "r1v.cli"]
                kill: dict[str, float] = {}

                def on_tick(run_dir: Path, marks: dict[str, float], kill=kill) -> None:
                    train = run_dir / "stages" / "sft" / "ray" / "train"
                    if "at" not in kill and (train / "step-000004").exists():
                        kill.setdefault("seen", time.monotonic())
                        if time.monotonic() - kill["seen"] >= 1.0:
                            trainers = list_actors(address=cluster.dashboard, detail=True, filters=[
                                ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                            os.kill(trainers[0].pid, signal.SIGKILL)
                            kill["at"] = time.time()

                if mode == "local":
                    # one machine's 2 CPUs: trainers of 1 CPU each would leave none to the Ray Data tasks
                    # feeding them (the cluster's worker nodes have 3 each)
                    m = _follow([*cli, "run", str(wf), "stages.sft.config.trainer.cpus_per_worker=0.5"], root)
                else:
                    m = _follow([*cli, "submit", str(wf), "--address", cluster.dashboard, "--follow"], root,
                                on_tick if mode == "killed" else None)
                run_dir = m.pop("run_dir")  # type: ignore[arg-type]
                row = {k: round(v, 1) for k, v in m.items()}
                if mode == "killed":
                    losses, resumed = _losses(run_dir)
                    steps = [s for s, _ in losses]
                    # the restarted group's first step: the last time the step after the one it resumed from
                    # was logged (surviving ranks may log a step or two between the kill and the group's end)
                    again = max(t for s, t in losses if s == int(resumed) + 1)
                    row.update(kill_to_training_again=round(again - kill["at"], 1), resumed_from=resumed,
                               steps_lost=len({s for s in steps if steps.count(s) > 1}))
                rows[mode].append(row)
                print(f"{mode} #{rep}: {row}", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[mode])

    print("\n| figure | median (s) | runs |\n|---|---|---|")
    for mode, key, what in [("local", "first_stage", "`r1v run` (local Ray) to first stage running"),
                            ("submitted", "first_stage", "`r1v submit` to first stage running"),
                            ("local", "sft", "`r1v run` to SFT running (after data + models)"),
                            ("submitted", "sft", "`r1v submit` to SFT running"),
                            ("local", "end", "`r1v run` to the end"),
                            ("submitted", "end", "`r1v submit --follow` to the end"),
                            ("killed", "end", "submitted with a trainer killed, to the end"),
                            ("killed", "kill_to_training_again", "kill to training again")]:
        print(f"| {what} | {med(mode, key):.1f} | {', '.join(str(r[key]) for r in rows[mode])} |")
    print(f"| submission overhead to first stage (submitted - local) | "
          f"{med('submitted', 'first_stage') - med('local', 'first_stage'):.1f} | |")
    print(f"| steps lost to the kill (trained twice), checkpoint every 4 | "
          f"{statistics.median(r['steps_lost'] for r in rows['killed'])} | "
          f"{', '.join(str(r['steps_lost']) for r in rows['killed'])} |")


if __name__ == "__main__":
    main()
