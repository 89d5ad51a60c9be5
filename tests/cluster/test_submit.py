"""`r1v submit` validates before it submits: a bad config is an error and no job. (A submitted workflow running on
worker nodes, with MLflow on a tracking server, is in test_failures.py, where a trainer is killed in it.)"""

from __future__ import annotations

from pathlib import Path

from cluster.conftest import r1v

WORKFLOW = """
name: submitted
run_root: {root}
tracking: {{tracking_uri: "{uri}", experiment: cluster}}
stages:
  data: {{kind: data.synthetic, config: {{n_train: 41, n_test: 4, corrupt_rows: 1}}}}
  models: {{kind: model.tiny}}
  sft:
    kind: sft
    config: {{model: "@models.model", corpus: "@data.train", batch_size: 2, checkpoint_every: 4,
             optim: {{lr: 1.0e-3}}, trainer: {{num_workers: 2, cpus_per_worker: 1}}}}
"""


def _workflow(tmp_path: Path, uri: str) -> Path:
    p = tmp_path / "wf.yaml"  # outside the checkout: submit ships it in the package
    p.write_text(WORKFLOW.format(root=tmp_path / "shared" / "runs", uri=uri))
    return p


def test_a_bad_config_submits_nothing(local_cluster, tmp_path, capsys):
    wf = _workflow(tmp_path, "http://127.0.0.1:1")
    res = r1v("submit", str(wf), "stages.sft.config.bogus=1", "--address", local_cluster.dashboard)
    assert res.returncode == 2 and "stages.sft.config.bogus" in res.stderr
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(local_cluster.dashboard).list_jobs()
    assert not [j for j in jobs if (j.metadata or {}).get("r1v.run_dir", "").startswith(str(tmp_path))]
