"""A run whose run root is an object store (moto's S3-compatible server on 127.0.0.1) and whose MLflow is a
tracking server: the stages' outputs, states and records live in the store, `r1v status` reads them from there,
and a resume from a node that has no local copy (the mirror deleted) reads only the store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from r1v.cli.app import main
from r1v.core import storage
from r1v.core.config import ConfigError
from r1v.workflow.runner import Runner, read_events
from r1v.workflow.schema import load_workflow

WORKFLOW = """
name: s3run
run_root: {root}
tracking: {{tracking_uri: "{mlflow}", experiment: s3}}
ray: {{num_cpus: 2}}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 8, n_test: 2, corrupt_rows: 1}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 2,
             optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 1}}}}
"""


@pytest.fixture
def s3(cluster_s3, tmp_path, monkeypatch):
    """The session's S3-compatible server; this process and the CLIs it starts have its credentials."""
    for k, v in cluster_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("R1V_CACHE", str(tmp_path / "node-cache"))
    return cluster_s3


def _bucket(s3, name: str) -> str:
    """A bucket of this test's own (the server outlives it and serves every test of the session)."""
    return s3.create_bucket(f"{name}-{uuid.uuid4().hex[:12]}")


def _r1v(*args: str) -> subprocess.CompletedProcess:
    """`r1v ARGS` in a process of its own (a Ray cluster of its own, never the test session's)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="r1v-s3-ray-", dir="/tmp")  # short: Ray's socket paths
    try:
        return subprocess.run([sys.executable, "-m", "r1v.cli", *args], capture_output=True, text=True, env=env,
                              timeout=500)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_an_object_store_run_root_without_a_tracking_server_is_refused(tmp_path, s3):
    p = tmp_path / "wf.yaml"
    p.write_text(WORKFLOW.format(root=_bucket(s3, "nomlflow"), mlflow="").replace('tracking_uri: ""', "x: 1")
                 .replace("tracking: {x: 1, ", "tracking: {"))
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri"):
        Runner.create(load_workflow(p))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_in_an_object_store_resumes_from_the_store_alone(tmp_path, s3, tracking_server, capsys):
    mlflow = tracking_server
    root = _bucket(s3, "runs") + "/team/r1v"
    p = tmp_path / "wf.yaml"
    p.write_text(WORKFLOW.format(root=root, mlflow=mlflow.uri))
    r = Runner.create(load_workflow(p))
    uri = r.store
    assert uri and uri.startswith(root + "/s3run-") and r.run_dir == storage.mirror_dir(uri)
    assert r.run(only=["data", "models"]) == {"data": "ran", "models": "ran"}
    outputs = storage.read_json(f"{uri}/stages/models/state.json")["outputs"]
    assert outputs["model"] == f"{uri}/stages/models/substitute_vlm"  # recorded where every node finds it
    assert "substitute_vlm/config.json" in storage.read_manifest(f"{uri}/stages/models")

    # another node: no mirror, no staged copies; the store is all it has
    shutil.rmtree(tmp_path / "node-cache")
    assert main(["status", uri]) == 0
    out = capsys.readouterr().out
    assert f"run {uri}" in out and "sft" in out and "pending" in out
    # as a user runs it: its own local Ray cluster, whose workers inherit the credentials from its environment
    res = _r1v("resume", uri)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ran ['sft'], skipped ['data', 'models']" in res.stdout
    st = storage.read_json(f"{uri}/stages/sft/state.json")
    assert st["status"] == "done" and st["outputs"]["model"] == f"{uri}/stages/sft/model"
    progress = storage.read_json(f"{uri}/stages/sft/progress.json")  # rank 0's, into the store (docs/watching.md)
    assert progress["step"] == progress["total"] and "loss" in progress["metrics"]
    files = storage.list_files(f"{uri}/stages/sft")
    assert "model/config.json" in files and any(f.startswith("ray/") for f in files), sorted(files)  # + checkpoints
    # what sft read came from this node's checked copies of the store's objects
    store = tmp_path / "node-cache" / "store"
    assert list(store.glob("*/s3/runs-*/team/r1v/*/stages/models/substitute_vlm/config.json"))
    assert list(store.glob("*/s3/runs-*/team/r1v/*/stages/data/**/*.parquet"))
    assert "model/.r1v-manifest.json" in files  # the workers' upload: the model checked where it is staged

    # a third node: everything is done, read from the store
    shutil.rmtree(tmp_path / "node-cache")
    assert main(["resume", uri]) == 0
    assert "skipped ['data', 'models', 'sft']" in capsys.readouterr().out
    assert [e["event"] for e in read_events(storage.mirror_dir(uri))].count("skipped") >= 5
    local = storage.stage_local(st["outputs"]["model"])
    assert (local / "config.json").exists()

    # the credentials reached no record: not the store's objects, not the logs, not MLflow's params
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for rel in storage.list_files(uri):
        if not rel.endswith((".safetensors", ".parquet", ".pt", ".png")):
            assert secret not in (storage.get_bytes(f"{uri}/{rel}") or b""), rel
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow.uri).get_run(r.meta["parent_run_id"])
    assert secret.decode() not in str(run.data.params) and run.data.tags["r1v.run_dir"] == uri
