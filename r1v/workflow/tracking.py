"""MLflow helpers: parent/child runs for a workflow, and a logger that workers use without owning the run.

Why the client API and not `mlflow.start_run` in workers: a worker that ends the driver's run ends it for
everyone (RUNTIME-NOTES), so workers only ever log *into* a run id they are handed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from r1v.core.overrides import flatten

PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(run_root: str | Path) -> str:
    return f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None = None) -> str:
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def start_run(tracking_uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = _client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def set_status(tracking_uri: str, run_id: str, status: str) -> None:
    """status: RUNNING, FINISHED, FAILED or KILLED."""
    client = _client(tracking_uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))


class RunLogger:
    """Logs metrics, params and artifacts into an existing MLflow run; never starts or ends it."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._c = _client(tracking_uri) if tracking_uri and run_id else None

    @property
    def active(self) -> bool:
        return self._c is not None

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self._c:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]
        if batch:
            self._c.log_batch(self.run_id, metrics=batch)

    def params(self, values: dict[str, Any]) -> None:
        if not self._c:
            return
        from mlflow.entities import Param

        flat = flatten(values)
        items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._c.log_batch(self.run_id, params=items[i : i + 100])

    def tags(self, values: dict[str, str]) -> None:
        if self._c:
            for k, v in values.items():
                self._c.set_tag(self.run_id, k, v)

    def text(self, text: str, artifact_file: str) -> None:
        if self._c:
            self._c.log_text(self.run_id, text, artifact_file)

    def dict(self, data: Any, artifact_file: str) -> None:
        self.text(json.dumps(data, indent=2, default=str), artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._c:
            self._c.log_artifact(self.run_id, str(path), artifact_path)

    def table_rows(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """JSONL artifact (sample generations, verdicts): readable anywhere without MLflow's table viewer."""
        if not self._c or not rows:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            p.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
            parent = str(Path(artifact_file).parent)
            self._c.log_artifact(self.run_id, str(p), None if parent == "." else parent)
