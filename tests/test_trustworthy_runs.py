"""Resume never deletes or mislabels work: fingerprints cover what changes results, a changed stage's old directory
is set aside (not deleted), `--only` refuses a stale upstream, a run has one driver, and a killed driver reads
`interrupted`. The engine's own behaviour, so the stages here are cheap (test kinds, or states of real kinds
written by the test); the ML stages' side (checkpoints, worker counts) is tested in tests/train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from r1v_test_kinds import wait_for

from r1v.cli import main
from r1v.core.config import ConfigError
from r1v.core.fs import atomic_write_json
from r1v.train.config import SFTConfig
from r1v.workflow import kinds
from r1v.workflow.fingerprint import SCHEME
from r1v.workflow.runner import Runner, read_events
from r1v.workflow.schema import load_workflow

PLUGINS = Path(__file__).resolve().parent / "plugins"

SFT_WF = """
name: wf
run_root: {root}
stages:
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: /nowhere, optim: {{lr: 0.001}}, log_every: 1, checkpoint_every: 2,
             trainer: {{num_workers: 2}}}}
"""


def _finished_sft_run(tmp_path: Path, legacy: bool = False) -> Runner:
    """A run whose two stages are done (states and outputs as the runner writes them; a checkpoint file in sft's
    directory stands for its work), without training anything."""
    p = tmp_path / "wf.yaml"
    p.write_text(SFT_WF.format(root=tmp_path / "runs"))
    r = Runner.create(load_workflow(p), tmp_path / "runs" / "r")
    fps = r.fingerprints(1 if legacy else SCHEME)
    for name, outs in (("models", ("model", "llm")), ("sft", ("model", "quarantine"))):
        d = r.stage_dir(name)
        outputs = {o: str(d / o) for o in outs}
        for path in outputs.values():
            Path(path).mkdir(parents=True)
        state = {"status": "done", "fingerprint": fps[name], "outputs": outputs, "attempts": 1}
        if not legacy:
            state.update(scheme=SCHEME, inputs={"models": fps["models"]} if name == "sft" else {})
        atomic_write_json(d / "state.json", state)
    (r.stage_dir("sft") / "ckpt-000010.safetensors").write_bytes(b"work")
    return r


def test_operational_fields_change_nothing(tmp_path):
    r = _finished_sft_run(tmp_path)
    for override in ("stages.sft.config.log_every=5", "stages.sft.config.checkpoint_every=7",
                     "stages.sft.config.keep_checkpoints=4", "stages.sft.config.trainer.torch_threads=2",
                     "stages.sft.config.trainer.cpus_per_worker=1"):
        again = Runner.open(r.run_dir, [override])
        assert again.plan() == [], override
        assert again.run() == {"models": "skipped", "sft": "skipped"}
    assert (r.stage_dir("sft") / "ckpt-000010.safetensors").read_bytes() == b"work"
    assert "log_every: 5" in (r.run_dir / "workflow.yaml").read_text()


def test_the_worker_count_counts_only_through_the_batch_it_makes(tmp_path):
    r = _finished_sft_run(tmp_path)
    # grad_accum 2 with 1 worker: the same rows per optimizer step as 1 x 2 workers
    assert Runner.open(r.run_dir, ["stages.sft.config.trainer.num_workers=1",
                                   "stages.sft.config.grad_accum=2"]).plan() == []
    assert Runner.open(r.run_dir, ["stages.sft.config.trainer.num_workers=1"]).plan() == ["sft"]


def test_a_new_defaulted_field_leaves_a_finished_run_done(tmp_path, monkeypatch):
    r = _finished_sft_run(tmp_path)

    class SFTConfigNext(SFTConfig):  # a release that adds a field at its default
        warmup_shape: str = "linear"

    monkeypatch.setitem(kinds.BUILTIN, "sft", kinds.StageKind("sft", SFTConfigNext, "r1v.train.stage:sft_stage",
                                                              ("model", "quarantine"), resumable=True))
    again = Runner.open(r.run_dir)
    assert isinstance(again.wf.stage_configs["sft"], SFTConfigNext)
    assert [row["status"] for row in again.status_rows()] == ["done", "done"]
    assert again.plan() == []
    # set away from its default, it is a change of results
    assert Runner.open(r.run_dir, ["stages.sft.config.warmup_shape=cosine"]).plan() == ["sft"]


def test_a_run_written_under_the_old_scheme_stays_done_and_moves_to_the_new_one(tmp_path):
    r = _finished_sft_run(tmp_path, legacy=True)
    old = r.state("sft")["fingerprint"]
    again = Runner.open(r.run_dir)
    assert [row["status"] for row in again.status_rows()] == ["done", "done"]
    assert again.run() == {"models": "skipped", "sft": "skipped"}
    st = again.state("sft")
    assert (st["scheme"], st["legacy_fingerprint"], st["fingerprint"]) == (SCHEME, old, again.fingerprints()["sft"])
    assert Runner.open(r.run_dir, ["stages.sft.config.log_every=9"]).plan() == []


def test_a_results_change_sets_the_old_directory_aside_and_gc_removes_it(tmp_path, capsys):
    r = _finished_sft_run(tmp_path)
    old_fp = r.state("sft")["fingerprint"]
    again = Runner.open(r.run_dir, ["stages.sft.config.optim.lr=0.01"])
    assert again.plan() == ["sft"]
    # the sft kind would train for real here: running it is tests/train's business; setting aside is the engine's
    again._set_aside("sft", again.state("sft"))
    kept = r.run_dir / "superseded" / f"sft-{old_fp}"
    assert (kept / "ckpt-000010.safetensors").read_bytes() == b"work"
    assert json.loads((kept / "state.json").read_text())["status"] == "done"
    assert main(["status", str(r.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"superseded/sft-{old_fp}" in out and "r1v gc" in out
    assert main(["gc", str(r.run_dir), "--dry-run"]) == 0
    assert kept.exists()
    assert main(["gc", str(r.run_dir)]) == 0
    assert not kept.exists() and "freed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- a re-run, end to end (test kinds)

CHAIN = """
name: chain
run_root: {root}
stages:
  up: {{kind: test.sleep, config: {{seconds: 0, text: "{text}"}}}}
  ev: {{kind: test.sleep, needs: [up], config: {{seconds: 0, text: ev}}}}
"""


def _chain(tmp_path: Path, text: str = "A") -> Path:
    p = tmp_path / "chain.yaml"
    p.write_text(CHAIN.format(root=tmp_path / "runs", text=text))
    return p


def test_a_rerun_keeps_the_old_output_until_gc_and_resume_says_what_it_sets_aside(tmp_path, capsys):
    assert main(["run", str(_chain(tmp_path)), "--run-dir", str(tmp_path / "runs" / "r")]) == 0
    run = tmp_path / "runs" / "r"
    old_up = json.loads((run / "stages" / "up" / "state.json").read_text())
    capsys.readouterr()
    assert main(["resume", str(run), "stages.up.config.text=B", "-v"]) == 0
    out = capsys.readouterr().out
    assert "will run 2 stage(s): up, ev" in out and "sets aside stages/up" in out
    assert (run / "superseded" / f"up-{old_up['fingerprint']}" / "out.txt").read_text() == "A"
    assert (run / "stages" / "up" / "out.txt").read_text() == "B"
    assert [e["event"] for e in read_events(run) if e["event"] == "set_aside"] == ["set_aside", "set_aside"]
    # made private: only the owner reads or writes a run (checkpoints, configs, corpora)
    assert {oct(p.stat().st_mode & 0o777) for p in (run, run / "stages" / "up", run / "stages" / "up" / "out.txt",
                                                    run / "workflow.yaml")} <= {"0o700", "0o600"}


def test_only_refuses_a_stale_upstream_and_runs_it_first_when_asked(tmp_path, capsys):
    assert main(["run", str(_chain(tmp_path)), "--run-dir", str(tmp_path / "runs" / "r")]) == 0
    run = tmp_path / "runs" / "r"
    before = (run / "workflow.yaml").read_bytes()
    capsys.readouterr()
    assert main(["resume", str(run), "stages.up.config.text=B", "--only", "ev"]) == 2
    err = capsys.readouterr().err
    assert "ev reads up, which is not current (its config changed)" in err and "--with-needs" in err
    assert (run / "workflow.yaml").read_bytes() == before  # refused before the override was stored
    with pytest.raises(ConfigError, match="ev reads up"):
        Runner.open(run, ["stages.up.config.text=B"]).run(only=["ev"])
    assert main(["resume", str(run), "stages.up.config.text=B", "--only", "ev", "--with-needs"]) == 0
    r = Runner.open(run)
    assert r.run() == {"up": "skipped", "ev": "skipped"}
    assert r.state("ev")["inputs"] == {"up": r.state("up")["fingerprint"]}
    arts = [a.path for a in MlflowClient(r.meta["tracking_uri"]).list_artifacts(r.meta["parent_run_id"], "overrides")]
    assert arts == ["overrides/resume-001.txt"]  # the refused resume stored nothing, the accepted one is recorded
    assert [row["status"] for row in r.status_rows()] == ["done", "done"]


def test_a_stage_that_read_an_older_upstream_is_not_current(tmp_path):
    assert main(["run", str(_chain(tmp_path)), "--run-dir", str(tmp_path / "runs" / "r")]) == 0
    r = Runner.open(tmp_path / "runs" / "r")
    st = r.state("ev")
    atomic_write_json(r.stage_dir("ev") / "state.json", {**st, "inputs": {"up": "0123456789abcdef"}})
    assert [row["status"] for row in r.status_rows()] == ["done", "stale"]
    assert r.status_rows()[1]["error"] == ["upstream up changed since it read it"]
    assert r.plan() == ["ev"]


# ----------------------------------------------------------------------------- one driver; a killed one

SLOW = """
name: slow
run_root: {root}
stages:
  nap: {{kind: test.sleep, config: {{seconds: {seconds}}}}}
"""


def _driver(args: list[str]) -> subprocess.Popen:
    """`r1v ARGS` in a child process that knows the test kinds."""
    code = "import sys, r1v_test_kinds; from r1v.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_driver_reads_interrupted_and_a_second_driver_is_refused(tmp_path, capsys):
    wf = tmp_path / "slow.yaml"
    wf.write_text(SLOW.format(root=tmp_path / "runs", seconds=120))
    run = tmp_path / "runs" / "r"
    first = _driver(["run", str(wf), "--run-dir", str(run)])
    try:
        wait_for(run / "stages" / "nap" / "pid")
        assert main(["status", str(run)]) == 0
        assert " running " in capsys.readouterr().out
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        first.kill()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert " interrupted " in out and f"pid {first.pid}" in out

    (run / "stages" / "nap" / "pid").unlink()
    second = _driver(["resume", str(run)])
    try:
        wait_for(run / "stages" / "nap" / "pid")
        t0 = time.monotonic()
        assert main(["resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"pid {second.pid} on host" in err and time.monotonic() - t0 < 60  # not queued behind the nap
        assert main(["gc", str(run)]) == 2  # gc waits its turn too
        capsys.readouterr()
        # SIGTERM: the stage is recorded failed and its MLflow run ends KILLED
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 1, second.stderr.read() if second.stderr else ""
    finally:
        second.kill()
    r = Runner.open(run)
    st = r.state("nap")
    assert st["status"] == "failed" and st["interrupted"] and "SIGTERM" in st["error"]
    client = MlflowClient(r.meta["tracking_uri"])
    assert client.get_run(st["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(r.meta["parent_run_id"]).info.status == "KILLED"
    assert [row["status"] for row in r.status_rows()] == ["interrupted"]
