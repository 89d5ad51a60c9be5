"""`r1v submit --run-root s3://...` on a head and two worker nodes (127.0.0.1): the run lives in an S3-compatible
store (moto), MLflow on a tracking server; the nodes take the store's credentials from their own environment, the
job's runtime_env carries none; the trainers upload the model and checkpoints to the store themselves."""

from __future__ import annotations

import pytest

from cluster.conftest import r1v
from r1v.core import storage

WORKFLOW = """
name: s3submitted
tracking: {{tracking_uri: "{uri}", experiment: cluster-s3}}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 16, n_test: 2, corrupt_rows: 1}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 2,
             optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 2, cpus_per_worker: 1}}}}
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submit_with_the_run_root_in_an_object_store(local_cluster, cluster_s3, tracking_server, tmp_path,
                                                    monkeypatch):
    for k, v in cluster_s3.env.items():  # this machine reads the store too (status), as a user's laptop would
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("R1V_CACHE", str(tmp_path / "laptop-cache"))
    root = cluster_s3.create_bucket("cluster-runs") + "/r1v"
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(uri=tracking_server.uri))
    res = r1v("submit", str(wf), "--address", local_cluster.dashboard, "--run-root", root, "--follow")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    uri = next(line.split(" ", 2)[2] for line in res.stdout.splitlines() if line.startswith("r1v: run "))
    assert uri.startswith(root + "/s3submitted-")

    st = r1v("status", uri)
    assert st.returncode == 0, st.stderr[-2000:]
    assert [ln.split()[2] for ln in st.stdout.splitlines() if ln.split()[:1] in (["data"], ["models"], ["sft"])] \
        == ["done"] * 3
    assert "SUCCEEDED" in st.stdout
    sft = storage.read_json(f"{uri}/stages/sft/state.json")
    assert sft["outputs"]["model"] == f"{uri}/stages/sft/model"
    files = storage.list_files(f"{uri}/stages/sft")
    assert "model/.r1v-manifest.json" in files and any(f.startswith("ray/train/") for f in files)
    assert storage.read_json(f"{uri}/stages/sft/epoch-0-counts.json")["rows_in"] == 16
    # the driver's node never held the model the trainers exported: they uploaded it
    head_mirror = local_cluster.root / "cache" / "head" / "runs" / "s3" / uri.removeprefix("s3://")
    assert (head_mirror / "run.json").exists() and not (head_mirror / "stages" / "sft" / "model").exists()

    from ray.job_submission import JobSubmissionClient

    job = storage.read_json(f"{uri}/run.json")["job"]["id"]
    info = JobSubmissionClient(local_cluster.dashboard).get_job_info(job)
    assert cluster_s3.env["AWS_SECRET_ACCESS_KEY"] not in str(info.runtime_env)
