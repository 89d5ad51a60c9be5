"""Screenshots of a run as a user watches it in the MLflow UI: the experiment, the parent run (its description and
results table), a GRPO stage's metric charts and its sample table.

    python bench/mlflow_screens.py RUN [--out DIR] [--chromium PATH] [--port N]

RUN is a run directory (or an object-store run URI). With a local store (SQLite, the default) the MLflow UI is
started here on 127.0.0.1 (`mlflow server`, stopped by its pid at the end); with a tracking server
(`tracking.tracking_uri=http://...`) its own UI is used. Pages are opened in headless Chromium (`--screenshot`),
which this script does not install: it looks for `--chromium`, `$CHROMIUM`, then `chromium`, `chromium-browser`,
`google-chrome`, `google-chrome-stable` and `headless_shell` on PATH, and exits 2 saying so when none is there.
Screenshots go to DIR (default RUN/screens/): experiment.png, parent.png, parent-results.png (the results table),
STAGE-metrics.png, STAGE-samples.png. The links open the UI's model-training view (`?workflowType=machine_learning`).
Without a GRPO stage, the first stage with a sample table stands in for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell")


def find_chromium(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("CHROMIUM"), *BROWSERS):
        if cand and (path := shutil.which(cand) or (cand if Path(cand).is_file() else None)):
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the MLflow UI exited with {proc.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def shoot(chromium: str, url: str, out: Path, wait_ms: int, height: int = 1000) -> None:
    """One page to a PNG; `--virtual-time-budget` lets the UI's requests finish before the screenshot."""
    # no background networking: the browser only talks to the UI on 127.0.0.1
    cmd = [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--window-size=1600,{height}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    print(f"{out}  <- {url}")


def pick_stage(run_dir: Path, client) -> tuple[str, str, str | None]:
    """(stage, its MLflow run id, its first sample table) of the first GRPO stage, else of the first stage that
    logged a sample table. Read from the run's files alone (no validation: a plugin's kinds need not import)."""
    import json

    import yaml

    from r1v.core.fs import read_json

    stages = (yaml.safe_load((run_dir / "workflow.yaml").read_text()) or {}).get("stages") or {}
    runs = {n: st["mlflow_run_id"] for n in stages
            if (st := read_json(run_dir / "stages" / n / "state.json", {}) or {}).get("mlflow_run_id")}
    order = sorted(runs, key=lambda n: stages[n].get("kind") != "grpo")  # GRPO first, workflow order otherwise
    if not order:
        raise SystemExit("mlflow_screens: no stage of this run has an MLflow run yet")
    for name in order:
        logged = json.loads(client.get_run(runs[name]).data.tags.get("mlflow.loggedArtifacts", "[]"))
        tables = sorted(a["path"] for a in logged if a.get("type") == "table")
        if tables or stages[name].get("kind") == "grpo":
            return name, runs[name], tables[0] if tables else None
    return order[0], runs[order[0]], None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory or object-store run URI")
    ap.add_argument("--out", type=Path, help="where the screenshots go (default RUN/screens)")
    ap.add_argument("--chromium", help="the Chromium (or Chrome) binary")
    ap.add_argument("--port", type=int, help="port of the local MLflow UI (default: a free one)")
    ap.add_argument("--wait-ms", type=int, default=120000,
                    help="virtual time each page gets to load its charts (default 120000)")
    args = ap.parse_args()

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("mlflow_screens: no Chromium found (tried --chromium, $CHROMIUM, " + ", ".join(BROWSERS) + "): "
              "install one (e.g. `apt-get install chromium` or Playwright's `playwright install chromium`, then "
              "--chromium PATH) to take the screenshots; nothing was started", file=sys.stderr)
        return 2

    from mlflow.tracking import MlflowClient

    from r1v.core.fs import read_json
    from r1v.workflow.runner import locate, pull_records
    from r1v.workflow.tracking import is_local_store, ui_url

    run_dir, store = locate(args.run)
    if store is not None:
        pull_records(run_dir, store)
    meta = read_json(run_dir / "run.json", None)
    if not meta:
        print(f"mlflow_screens: {args.run} is not an r1v run directory (no run.json)", file=sys.stderr)
        return 2
    uri, exp, parent = meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"]
    client = MlflowClient(uri)
    stage, stage_run, table = pick_stage(run_dir, client)
    out = args.out or run_dir / "screens"
    out.mkdir(parents=True, exist_ok=True)

    server = None
    if is_local_store(uri):
        port = args.port or free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(out / "mlflow-ui.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"mlflow_screens: MLflow UI pid {server.pid} on {base} (log: {out / 'mlflow-ui.log'})")
    else:
        base = uri.rstrip("/")
    try:
        wait_http(f"{base}/health", server)
        pages = {"experiment.png": ui_url(base, exp), "parent.png": ui_url(base, exp, parent),
                 "parent-results.png": ui_url(base, exp, parent, "artifacts/results/table.json"),
                 f"{stage}-metrics.png": ui_url(base, exp, stage_run, "model-metrics")}
        if table:
            pages[f"{stage}-samples.png"] = ui_url(base, exp, stage_run, f"artifacts/{table}")
        else:
            print(f"mlflow_screens: stage {stage} has no sample table yet", file=sys.stderr)
        for name, url in pages.items():
            # the metrics page is a grid of charts, the stage's own below its progress charts
            shoot(chromium, url, out / name, args.wait_ms, 1900 if name.endswith("-metrics.png") else 1000)
    finally:
        if server is not None:  # the UI's process group (gunicorn/uvicorn workers), by the pid it started with
            try:
                os.killpg(server.pid, 15)
                server.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                if server.poll() is None:
                    os.killpg(server.pid, 9)
                    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
