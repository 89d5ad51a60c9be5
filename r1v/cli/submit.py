"""`r1v submit | stop`, and `resume --address`: a workflow as a Ray job on a cluster, through the Ray Jobs SDK.

`submit` validates the workflow here first (a bad config prints the error and submits nothing), packages this
checkout as the job's `working_dir` (runs, venvs, checkpoints and caches excluded), and runs `r1v run` as the
entrypoint with the run directory named here, so it can print the run, the job and where to watch at once. The
driver records its job (id and address) in RUN/run.json: `status` names the job and its state, `stop` stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import secrets
import shlex
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from r1v.core import storage
from r1v.core.config import ConfigError
from r1v.core.fs import atomic_write_json, read_json
from r1v.workflow.runner import Runner, check_only
from r1v.workflow.schema import load_workflow
from r1v.workflow.tracking import is_local_store

EXCLUDES = [".git", ".venv", "venv", "runs", "mlruns", "mlartifacts", ".pytest_cache", ".ruff_cache", "__pycache__",
            "*.egg-info", "*.safetensors", "*.pt", "*.bin", "*.parquet", ".ipynb_checkpoints", "build", "dist"]
"""Left out of the uploaded package: run outputs, environments, checkpoints, corpora, caches (gitignore syntax)."""

PACKAGE_DATA = ["!/r1v/**", "__pycache__"]
"""...but never the r1v package's own files (the world's backbones are safetensors), its bytecode aside."""

MAX_UPLOAD = 500 * 2**20
"""Ray stores a working_dir package in its GCS, which refuses packages over 512 MiB."""

JOB_ENV = "R1V_JOB_ID"
ADDRESS_ENV = "R1V_JOB_ADDRESS"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120.0
STAGING = ".r1v-submit"
"""Where a submitted workflow file is staged inside the package (for the upload only)."""


def project_root() -> Path:
    """The checkout whose code is submitted: the directory holding the `r1v` package and pyproject.toml."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"r1v is not running from a checkout ({root} has no pyproject.toml): `r1v submit` uploads "
                          "the checkout as the job's working_dir")
    return root


@functools.cache
def _spec():
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches `excludes` with

    return PathSpec.from_lines("gitwildmatch", EXCLUDES + PACKAGE_DATA)


def _excluded(rel: str) -> bool:
    return _spec().match_file(rel)


def package_size(root: Path) -> tuple[int, list[tuple[int, str]]]:
    """Bytes that the upload would hold, and its largest files (to explain an upload that is too large)."""
    total, files = 0, []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not _excluded(os.path.join(rel_dir, d))]
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if _excluded(rel):
                continue
            try:
                size = os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
            total += size
            files.append((size, rel))
    return total, sorted(files, reverse=True)[:5]


def _loopback(address: str) -> bool:
    host = urllib.parse.urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def check_tracking(tracking_uri: str | None, address: str) -> None:
    """A store only the submitting machine's disk holds cannot take logs from a remote cluster's nodes."""
    if is_local_store(tracking_uri) and not _loopback(address):
        raise ConfigError(
            f"tracking.tracking_uri is {tracking_uri or 'the default SQLite file under run_root'}, which the nodes "
            f"of the cluster at {address} cannot share (on another node MLflow would create an empty database). "
            "Start an MLflow tracking server (`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri "
            "postgresql://... --serve-artifacts --artifacts-destination s3://.../mlartifacts`, docs/cluster.md) and "
            "pass tracking.tracking_uri=http://MLFLOW_HOST:5000")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:  # like the `ray` CLI: a token of this machine's (~/.ray/auth_token) is used when RAY_AUTH_MODE is unset
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:  # a Ray without token authentication
        pass
    return JobSubmissionClient(address)


def _runtime_env(root: Path, job_id: str, address: str) -> dict[str, Any]:
    total, largest = package_size(root)
    if total > MAX_UPLOAD:
        top = ", ".join(f"{rel} ({size / 2**20:.0f} MiB)" for size, rel in largest)
        raise ConfigError(f"the package to upload from {root} is {total / 2**20:.0f} MiB, over Ray's "
                          f"{MAX_UPLOAD / 2**20:.0f} MiB: move large files out of the checkout or under an excluded "
                          f"name ({', '.join(EXCLUDES)}); largest: {top}")
    # Only identifiers here: the dashboard shows a job's env_vars to anyone who can open it.
    return {"working_dir": str(root), "excludes": EXCLUDES + PACKAGE_DATA,
            "env_vars": {JOB_ENV: job_id, ADDRESS_ENV: address, "RAY_JOB_STOP_WAIT_TIME_S": "30",
                         "PYTHONUNBUFFERED": "1"}}


def _submit(address: str, args_for_r1v: list[str], job_id: str, run_dir: str) -> None:
    root = project_root()
    entrypoint = shlex.join([sys.executable if _loopback(address) else "python", "-m", "r1v.cli", *args_for_r1v])
    client, env = _client(address), _runtime_env(root, job_id, address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=env,
                              metadata={"r1v.run_dir": run_dir})
            return
        except RuntimeError as e:  # a cluster that just started has no job agent yet: that passes
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _watch(address: str, job_id: str, run_dir: str, tracking_uri: str | None) -> None:
    print(f"r1v: run {run_dir}")
    print(f"r1v: job {job_id} on {address} (dashboard: {address.rstrip('/')}/#/jobs/{job_id})")
    if tracking_uri:
        print(f"r1v: MLflow {tracking_uri}")
    print(f"r1v: `r1v status {run_dir}`, `r1v stop {run_dir}`; logs: `ray job logs --address {address} -f {job_id}`")


def follow(address: str, job_id: str) -> int:
    """Print the job's log as it comes; the job's outcome as an exit status (0 when it succeeded)."""
    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL:
        time.sleep(1)
        status = str(client.get_job_status(job_id))
    status = status.split(".")[-1]
    print(f"r1v: job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"run_root={args.run_root}"] if args.run_root else [])
    wf = load_workflow(args.workflow, overrides)  # a bad config: the error, no job
    check_only(wf, args.only)
    check_tracking(wf.config.tracking.tracking_uri, args.address)
    if storage.is_uri(wf.config.run_root) and is_local_store(wf.config.tracking.tracking_uri):
        raise ConfigError(f"run_root {wf.config.run_root} is an object store, which an MLflow SQLite database "
                          "cannot live in: start an MLflow tracking server (docs/cluster.md) and pass "
                          "tracking.tracking_uri=http://MLFLOW_HOST:5000")  # here, before a job exists
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{wf.config.name}-{stamp}"
    run_dir = f"{wf.config.run_root.rstrip('/')}/{name}"
    job_id = f"r1v-{name}-{secrets.token_hex(3)}"  # two submissions in one second must not collide
    # The workflow file travels in the package (wherever it lies here), under a name of its own.
    staged = project_root() / STAGING / f"{job_id}.yaml"
    staged.parent.mkdir(exist_ok=True)
    staged.write_text(Path(args.workflow).read_text())
    try:
        cmd = ["run", f"{STAGING}/{staged.name}", *overrides, "--run-dir", run_dir]
        _submit(args.address, cmd + (["--only", *args.only] if args.only else []), job_id, run_dir)
    finally:
        staged.unlink(missing_ok=True)
    _watch(args.address, job_id, run_dir, wf.config.tracking.tracking_uri)
    return follow(args.address, job_id) if args.follow else 0


def submit_resume(args: argparse.Namespace) -> int:
    """`r1v resume RUN --address URL`: the resume as a job on the cluster. Checked here first when this machine
    sees the run."""
    run_dir = str(args.run)
    if storage.is_uri(run_dir) or (Path(run_dir) / "run.json").exists():
        runner = Runner.open(run_dir, args.overrides)  # validated, not stored: the job's driver stores them
        runner.plan(args.only, args.with_needs)
        check_tracking(runner.meta.get("tracking_uri"), args.address)
    job_id = f"r1v-{Path(run_dir).name}-resume-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    cmd = ["resume", run_dir, *args.overrides, *(["--with-needs"] if args.with_needs else []),
           *(["--only", *args.only] if args.only else [])]
    _submit(args.address, cmd, job_id, run_dir)
    _watch(args.address, job_id, run_dir, None)
    return follow(args.address, job_id) if args.follow else 0


def record_job(run_dir: Path) -> None:
    """In a job's driver: note the job in RUN/run.json (every resume job too), for `status` and `stop`."""
    job_id = os.environ.get(JOB_ENV)
    if not job_id:
        return
    meta = read_json(run_dir / "run.json", {}) or {}
    meta["job"] = {"id": job_id, "address": os.environ.get(ADDRESS_ENV)}
    meta.setdefault("jobs", []).append(job_id)
    atomic_write_json(run_dir / "run.json", meta)


def job_state(meta: dict[str, Any]) -> str | None:
    """'JOB on ADDRESS: STATE' for a run made by a job, or None; never fails (the cluster may be gone)."""
    job = meta.get("job")
    if not job:
        return None
    try:
        status = str(_client(job["address"]).get_job_status(job["id"])).split(".")[-1]
    except Exception as e:  # the dashboard unreachable, the job forgotten: say so, do not fail `status`
        status = f"unknown ({type(e).__name__}: {str(e)[:120]})"
    return f"job {job['id']} on {job['address']}: {status}"


def cmd_stop(args: argparse.Namespace) -> int:
    meta = (storage.read_json(storage.join(args.run, "run.json")) if storage.is_uri(args.run)
            else read_json(Path(args.run) / "run.json", None))
    if meta is None:
        raise FileNotFoundError(f"{args.run} is not an r1v run directory (no run.json)")
    job = meta.get("job")
    if not job:
        raise ConfigError(f"{args.run} was not started by `r1v submit` (no job in run.json): stop its driver "
                          "with Ctrl-C or SIGTERM")
    client = _client(job["address"])
    client.stop_job(job["id"])
    t0 = time.monotonic()
    status = str(client.get_job_status(job["id"])).split(".")[-1]
    while status not in TERMINAL and time.monotonic() - t0 < args.wait:
        time.sleep(1)
        status = str(client.get_job_status(job["id"])).split(".")[-1]
    print(f"r1v: job {job['id']} {status}; `r1v resume {args.run} --address {job['address']}` continues the run")
    return 0 if status in TERMINAL else 1


def add_submit_parsers(sub) -> None:
    s = sub.add_parser("submit", help="run a workflow as a Ray job on a cluster (validated here first)")
    s.add_argument("workflow")
    s.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    s.add_argument("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
    s.add_argument("--run-root", help="run root every node sees (a shared path, or s3://bucket/prefix with the "
                   "AWS_* variables set on every node, docs/storage.md); sets run_root")
    s.add_argument("--follow", action="store_true", help="print the job's log until it ends; exit with its status")
    s.add_argument("--only", nargs="+", help="run only these stages")
    s.set_defaults(fn=cmd_submit)

    st = sub.add_parser("stop", help="stop the Ray job running a submitted run (it then reads interrupted)")
    st.add_argument("run")
    st.add_argument("--wait", type=float, default=60, help="seconds to wait for the job to end")
    st.set_defaults(fn=cmd_stop)
