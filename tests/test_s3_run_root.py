"""A run whose run root is an object store (moto's S3-compatible server on 127.0.0.1) needs a tracking server.

A whole run in the store, resumed from a node with no copy of it, is the object-store demo's
(tests/cluster/test_demo.py): submitted to the multi-node cluster, it covers what a local run there would, and more."""

from __future__ import annotations

import uuid

import pytest

from r1v.core.config import ConfigError
from r1v.workflow.runner import Runner
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


def test_an_object_store_run_root_without_a_tracking_server_is_refused(tmp_path, s3):
    p = tmp_path / "wf.yaml"
    p.write_text(WORKFLOW.format(root=_bucket(s3, "nomlflow"), mlflow="").replace('tracking_uri: ""', "x: 1")
                 .replace("tracking: {x: 1, ", "tracking: {"))
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri"):
        Runner.create(load_workflow(p))
