"""`r1v submit` validates before it submits: a bad config is an error and no job. (A submitted workflow running on
worker nodes, with MLflow on a tracking server, is in test_failures.py, where a trainer is killed in it.)"""

from __future__ import annotations

import sys
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


PROBE = """
import ray
from r1v.generation.engines import EngineHost, start_engines

class Probe(EngineHost):
    def __init__(self, *args, **kwargs):  # no model: where it runs is the point
        pass

    def node(self):
        return ray.get_runtime_context().get_node_id()

ray.init()
handles = start_engines("transformers", "-", 2, num_cpus=0, num_gpus=0, max_batch=1, host=Probe, wait=False)
print("DRIVER", ray.get_runtime_context().get_node_id(), "ENGINES", *ray.get([h.node.remote() for h in handles]))
"""


def test_engines_that_request_nothing_stay_off_the_head(local_cluster, tmp_path):
    """CPU engines with `num_cpus: 0` (the tiny workflow's) would go to the job driver's node, the head, which
    offers no CPUs: start_engines keeps them on the worker nodes."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    from cluster.test_failures import TERMINAL, _wait

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    client = JobSubmissionClient(local_cluster.dashboard)
    job = client.submit_job(entrypoint=f"{sys.executable} {script}")
    _wait(lambda: str(client.get_job_status(job)).split(".")[-1] in TERMINAL, "the probe job", timeout=300)
    logs = client.get_job_logs(job)
    line = next((ln for ln in logs.splitlines() if ln.startswith("DRIVER")), None)
    assert line, logs[-3000:]
    driver, engines = line.split()[1], line.split()[3:]
    heads = {n.node_id for n in list_nodes(address=local_cluster.dashboard, detail=True) if "head" in n.resources_total}
    assert driver in heads and len(engines) == 2 and not set(engines) & heads, logs[-2000:]
