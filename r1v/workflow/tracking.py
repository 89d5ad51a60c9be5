"""MLflow helpers: parent/child runs for a workflow, and a logger that workers use without owning the run.

Why the client API and not `mlflow.start_run` in workers: a worker that ends the driver's run ends it for
everyone (RUNTIME-NOTES), so workers only ever log *into* a run id they are handed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from r1v.core.overrides import flatten

PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
"""A run's description, shown (as Markdown) at the top of its page in the MLflow UI."""
KIND_TAG = "mlflow.experimentKind"
"""The experiment tag MLflow 3's UI read (up to 3.16) to choose an experiment's layout: `custom_model_development`
("Machine learning") opens on the experiment's training runs, `genai_development` on traces. MLflow 3.17's UI
ignores it: its GenAI / Model training switch (kept in the browser, default GenAI) or the URL's `workflowType`
decides, so the links r1v prints carry `TRAINING_VIEW` (`ui_url`)."""
TRAINING_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"
TABLE_ROWS = 200
"""Rows of a sample table logged for MLflow's table viewer (the full samples stay in the stage's files)."""
THUMBNAIL = 256
"""Longest side, in pixels, of the images in a sample table."""


def ui_url(base: str, experiment_id: str, run_id: str | None = None, tab: str | None = None) -> str:
    """A page of the MLflow UI at `base` in its model-training view: the experiment, a run, or a run's tab
    (`model-metrics`, `artifacts/PATH`)."""
    path = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id:
        path += f"/runs/{run_id}" + (f"/{tab}" if tab else "")
    return f"{path}?{TRAINING_VIEW}"


def default_tracking_uri(run_root: str | Path) -> str:
    return f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's own HTTP retries default to 7 with a doubling backoff (minutes against a server that is down);
    # r1v keeps its own buffer and retry window (RunLogger), so a few quick tries per call are enough.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def is_local_store(tracking_uri: str | None) -> bool:
    """A store only this machine sees (SQLite or a file path): fine for a local cluster, wrong for a remote one."""
    return tracking_uri is None or tracking_uri.startswith(("sqlite:", "file:", "/", "."))


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path | None = None) -> str:
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if KIND_TAG not in exp.tags:  # a kind the user chose in the UI stays
            set_experiment_kind(client, exp.experiment_id)
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND})


def set_experiment_kind(client, experiment_id: str) -> None:
    """Best effort: the UI then opens the experiment on its runs (a store that refuses the tag changes nothing)."""
    try:
        client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
    except Exception as e:
        print(f"r1v: MLflow: could not tag experiment {experiment_id} ({type(e).__name__}: {str(e)[:200]})",
              file=sys.stderr, flush=True)


def start_run(tracking_uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = _client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def set_status(tracking_uri: str, run_id: str | None, status: str) -> bool:
    """status: RUNNING, FINISHED, FAILED or KILLED. Best effort: whether the store took it (a run's status in
    MLflow is a view of r1v's state files, which stay the record)."""
    if not run_id:
        return False
    try:
        client = _client(tracking_uri)
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))
    except Exception as e:
        print(f"r1v: MLflow: could not set run {run_id} {status} ({type(e).__name__}: {str(e)[:200]})",
              file=sys.stderr, flush=True)
        return False
    return True


def try_start_run(tracking_uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str | None:
    """`start_run`, or None when the store cannot be reached (the stage then runs unlogged, and says so)."""
    try:
        return start_run(tracking_uri, experiment_id, name, parent_run_id, tags)
    except Exception as e:
        print(f"r1v: MLflow: could not start a run for {name} ({type(e).__name__}: {str(e)[:200]}); the stage "
              "runs without tracking", file=sys.stderr, flush=True)
        return None


class RunLogger:
    """Logs metrics, params and artifacts into an existing MLflow run; never starts or ends it.

    Best effort: a tracking call that fails (a server restarting, a network outage) is counted, never raised, so
    tracking never kills a stage. Metrics are buffered (up to `MAX_PENDING`, oldest dropped first and counted)
    and sent again once `RETRY_S` has passed; while the store is failing, other calls are skipped and counted.
    On recovery the run gets a `tracking_failures` metric with the count.
    """

    MAX_PENDING = 100_000
    RETRY_S = 20.0

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._c = _client(tracking_uri) if tracking_uri and run_id else None
        self.failures = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._pending: list[Any] = []
        self._retry_at = 0.0
        self._reported = 0

    @property
    def active(self) -> bool:
        return self._c is not None

    def _try(self, fn, *args: Any, lost_if_skipped: bool = True, **kw: Any) -> bool:
        """Call the store; False (counted) when it fails or while the retry window of an earlier failure runs."""
        if time.monotonic() < self._retry_at:
            self.failures += lost_if_skipped  # buffered metrics are not lost: they go with the next try
            return False
        try:
            fn(*args, **kw)
        except Exception as e:  # any store error: counted and retried later, never fatal to the stage
            self.failures += 1
            if self.last_error is None:
                print(f"r1v: MLflow tracking call failed ({type(e).__name__}: {str(e)[:200]}); the stage goes on, "
                      f"metrics are kept and sent again every {self.RETRY_S:.0f} s", file=sys.stderr, flush=True)
            self.last_error = f"{type(e).__name__}: {str(e)[:300]}"
            self._retry_at = time.monotonic() + self.RETRY_S
            return False
        if self.last_error is not None:
            print(f"r1v: MLflow tracking is back after {self.failures} failed call(s)", file=sys.stderr, flush=True)
            self.last_error = None
        return True

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self._c:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]
        if len(self._pending) > self.MAX_PENDING:
            self.dropped += len(self._pending) - self.MAX_PENDING
            del self._pending[: len(self._pending) - self.MAX_PENDING]
        if self.failures > self._reported:
            self._pending.append(Metric("tracking_failures", float(self.failures), ts, step))
        self.flush()

    def flush(self) -> bool:
        """Send the buffered metrics; whether nothing is left."""
        while self._pending:
            batch = self._pending[:1000]  # MLflow's limit per log_batch
            if not self._try(self._c.log_batch, self.run_id, metrics=batch, lost_if_skipped=False):
                return False
            del self._pending[: len(batch)]
            self._reported = max(self._reported, *(int(m.value) for m in batch if m.key == "tracking_failures"),
                                 0)
        return True

    def params(self, values: dict[str, Any]) -> None:
        if not self._c:
            return
        from mlflow.entities import Param

        flat = flatten(values)
        items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._try(self._c.log_batch, self.run_id, params=items[i : i + 100])

    def tags(self, values: dict[str, str]) -> None:
        if self._c:
            for k, v in values.items():
                self._try(self._c.set_tag, self.run_id, k, v)

    def text(self, text: str, artifact_file: str) -> None:
        if self._c:
            self._try(self._c.log_text, self.run_id, text, artifact_file)

    def dict(self, data: Any, artifact_file: str) -> None:
        self.text(json.dumps(data, indent=2, default=str), artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._c:
            self._try(self._c.log_artifact, self.run_id, str(path), artifact_path)

    def table(self, rows: list[dict[str, Any]], artifact_file: str, images: str | None = None,
              replace: bool = False) -> None:
        """A table artifact (`artifact_file`, .json) for MLflow's table viewer (`MlflowClient.log_table`).

        `images`: a column of encoded images (bytes, or a list of them: the first is shown), turned into
        thumbnails; a row without one gets a blank placeholder (MLflow wants every cell of an image column to be an
        image). At most `TABLE_ROWS` rows; other cells are kept as they are when scalar, else as JSON text.
        `replace`: a table already logged under that name is replaced (MLflow's `log_table` appends to it)."""
        if not self._c or not rows:
            return
        try:
            import pandas as pd

            rows = rows[:TABLE_ROWS]
            cols = {k: [_cell(r.get(k)) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)
                    if k != images}
            if images:
                cols = {"image": [_thumbnail(r.get(images)) for r in rows], **cols}
            frame = pd.DataFrame(cols)
        except Exception as e:  # a row MLflow's table cannot hold: the JSONL artifacts still have it
            self.failures += 1
            print(f"r1v: MLflow: table {artifact_file} not logged ({type(e).__name__}: {str(e)[:200]})",
                  file=sys.stderr, flush=True)
            return
        if replace:
            self._try(self._delete_artifact, artifact_file, lost_if_skipped=False)
        self._try(self._c.log_table, self.run_id, frame, artifact_file)

    def _delete_artifact(self, artifact_file: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run = self._c.get_run(self.run_id)
        parent = str(Path(artifact_file).parent)
        if artifact_file not in {f.path for f in self._c.list_artifacts(self.run_id, None if parent == "." else
                                                                        parent)}:
            return
        # the client's tracking URI, not the process's: `mlflow-artifacts:` locations resolve against it
        get_artifact_repository(run.info.artifact_uri, tracking_uri=self.tracking_uri).delete_artifacts(artifact_file)

    def copy_metrics(self, src_run_id: str | None, keys: list[str], prefix: str) -> None:
        """The histories of `keys` in run `src_run_id` into this run as `PREFIX/KEY` (a stage's curves on the
        parent run). A key the source lacks is taken from its `progress/KEY` history, if any."""
        if not self._c or not src_run_id:
            return
        from mlflow.entities import Metric

        def history(key: str) -> list[Any]:
            return self._c.get_metric_history(src_run_id, key)

        for key in keys:
            got: list[Any] = []

            def fetch(k: str = key, into: list[Any] = got) -> None:
                into.extend(history(k) or history(f"progress/{k}"))

            if not self._try(fetch):
                return
            batch = [Metric(f"{prefix}/{key}", m.value, m.timestamp, m.step) for m in got]
            for i in range(0, len(batch), 1000):
                self._try(self._c.log_batch, self.run_id, metrics=batch[i : i + 1000])

    def table_rows(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """JSONL artifact (sample generations, verdicts): readable anywhere without MLflow's table viewer."""
        if not self._c or not rows:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            p.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
            parent = str(Path(artifact_file).parent)
            self._try(self._c.log_artifact, self.run_id, str(p), None if parent == "." else parent)


def _cell(v: Any) -> Any:
    """A table cell MLflow's JSON table holds: scalars as they are, anything else as JSON text."""
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return json.dumps(v, default=str)[:2000]


def _thumbnail(v: Any) -> Any:
    """A PIL thumbnail of an encoded image (the first of a list), or a small grey placeholder."""
    import io

    from PIL import Image

    data = v[0] if isinstance(v, list | tuple) and v else v
    if isinstance(data, bytes | bytearray) and data:
        try:
            img = Image.open(io.BytesIO(data))
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            return img.convert("RGB")
        except Exception:  # an undecodable image: the placeholder says there is nothing to show
            pass
    return Image.new("RGB", (16, 16), (200, 200, 200))
