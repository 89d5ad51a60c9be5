"""`r1v run | resume | status | eval ...` - the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from r1v.cli.data import add_data_parser
from r1v.cli.eval import add_run_parser
from r1v.cli.export import add_export_parser
from r1v.cli.grade import add_grade_parser
from r1v.cli.model import add_model_parser
from r1v.cli.plan import add_plan_parser
from r1v.cli.serve import add_serve_parser
from r1v.cli.submit import add_submit_parsers, job_state, record_job, submit_resume
from r1v.cli.world import add_world_parser
from r1v.core import storage
from r1v.core.config import ConfigError
from r1v.core.fs import read_json
from r1v.core.loopback import loopback_only
from r1v.core.noise import quiet_libraries, worker_env
from r1v.eval.results import format_table, report
from r1v.workflow.console import Console, show_path
from r1v.workflow.lock import RunBusy, RunLock, describe, holder
from r1v.workflow.runner import Runner, StageFailed, check_only, locate, pull_records
from r1v.workflow.schema import load_workflow
from r1v.workflow.tracking import is_local_store, ui_url


def init_ray(address: str | None, num_cpus: int | None, verbose: bool = True) -> bool:
    """Join RAY_ADDRESS / `address` when given, else start a local cluster (dashboard on: Ray Train needs it).

    Returns whether this call started Ray (then the caller shuts it down). A local cluster's workers inherit this
    process's environment; a joined cluster's get the noise switches through the job's runtime_env.
    """
    quiet_libraries(verbose)  # before `import ray`: Ray reads some of these at import
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": worker_env(verbose)})
    else:
        # "local": a cluster of this run's own, never one that `ray start` left on this machine; on the loopback
        # address (Ray would otherwise bind the machine's interface address, reachable from its network)
        loopback_only()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    return True


def _print_status(runner) -> None:
    rows = runner.status_rows()
    print(f"run {runner.where}  (MLflow run {runner.meta.get('parent_run_id')}, "
          f"store {runner.meta.get('tracking_uri')})")
    job = job_state(runner.meta)
    if job:
        print(job)
    w = max([16, *(len(r["stage"]) for r in rows)])  # repeat blocks make long names (round4_generate)
    print(f"{'stage':<{w}} {'kind':<16} {'status':<11} {'tries':>5} {'seconds':>8}  error / why / progress")
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"{r['stage']:<{w}} {r['kind']:<16} {r['status']:<11} {r['attempts']:>5} {secs:>8}  "
              f"{r['error'][0] or r.get('progress') or ''}")
        if r.get("progress") and r["error"][0]:  # an interrupted stage: where it got to, under its error
            print(f"{'':<{w}} {'':<16} {'':<11} {'':>5} {'':>8}  at {r['progress']}")
    if any(r["status"] == "interrupted" for r in rows):
        print(f"r1v: the driver that ran this is gone ({describe(holder(runner.run_dir))}); "
              f"`r1v resume {runner.where}` continues")
    aside = runner.superseded()
    if aside:
        total = sum(a["bytes"] for a in aside)
        print(f"superseded (set aside when their config changed; `r1v gc {runner.where}` removes them, "
              f"{_size(total)}):")
        for a in aside:
            print(f"  {a['path'].relative_to(runner.run_dir)}  {a['status']}  {_size(a['bytes'])}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cmd_run(args: argparse.Namespace) -> int:
    os.umask(0o077)  # run directories, checkpoints and logs private to their owner
    with Console(args.verbose) as con:  # from here until the table, output goes to RUN/logs unless --verbose
        wf = load_workflow(args.workflow, args.overrides)
        check_only(wf, args.only)  # before a run directory or a cluster exists
        runner = Runner.create(wf, args.run_dir)
        with RunLock(runner.run_dir, runner.store):
            record_job(runner.run_dir)
            con.attach(runner.run_dir)
            con.line(f"r1v: run directory {runner.where}")
            outcome = _execute(runner, con, wf.config.ray.address, wf.config.ray.num_cpus, args.only)
    return _report(runner, outcome, con)


def cmd_resume(args: argparse.Namespace) -> int:
    if args.address:
        return submit_resume(args)
    os.umask(0o077)
    run_dir, store = locate(args.run)
    if store is not None:
        pull_records(run_dir, store)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{args.run} is not an r1v run directory (no run.json)")
    with Console(args.verbose) as con, RunLock(run_dir, store) as lock:  # the lock before anything is written
        runner = Runner.open(args.run, args.overrides)
        check_only(runner.wf, args.only)
        runner.plan(args.only, args.with_needs)  # refuses a stale upstream before the overrides are stored
        record_job(run_dir)
        con.attach(runner.run_dir)
        if lock.previous:
            con.line(f"r1v: the previous driver ended without releasing the run ({describe(lock.previous)})")
        con.line(f"r1v: resuming {runner.where}")
        outcome = _execute(runner, con, runner.wf.config.ray.address, runner.wf.config.ray.num_cpus, args.only,
                           args.with_needs)
    return _report(runner, outcome, con)


def _execute(runner, con, address: str | None, num_cpus: int | None, only: list[str] | None,
             with_needs: bool = False):
    """Run the stages with `con` reporting; returns {stage: 'ran' | 'skipped'} or the StageFailed."""
    runner.console = con
    started: list[bool] = []

    def ray_on_first_need(kind) -> None:
        if kind.ray and not started:
            started.append(init_ray(address, num_cpus, con.verbose))

    runner.before_stage = ray_on_first_need
    try:
        return runner.run(only=only, with_needs=with_needs)
    except StageFailed as e:
        return e
    finally:
        if any(started):  # inside the capture: Ray's shutdown messages and late worker lines go to driver.log
            import ray

            ray.shutdown()


def _report(runner, outcome, con) -> int:
    """After the capture ended: the status table and what to do next."""
    logs = f"r1v: full logs in {show_path(con.log_dir)}/" if con.log_dir and not con.verbose else None
    if isinstance(outcome, StageFailed):
        if con.verbose:
            print(f"r1v: {outcome}", file=sys.stderr)
        else:
            print(f"r1v: stage {outcome.stage!r} failed; fix the cause, then: r1v resume {outcome.run_dir}",
                  file=sys.stderr)
        _print_status(runner)
        if logs:
            print(logs)
        return 1
    _print_status(runner)
    print(f"r1v: done; ran {[s for s, w in outcome.items() if w == 'ran']}, "
          f"skipped {[s for s, w in outcome.items() if w == 'skipped']}")
    if logs:
        print(logs)
    _print_results(runner.run_dir)
    runner.push_records()  # the results and the logs up to here
    return 0


def _print_results(run_dir: Path) -> None:
    """The run's results table (evals that declare a report row): RUN/results.json, parent MLflow run, console."""
    results = report(run_dir)
    if results is not None:
        print(format_table(results))
        print(f"r1v: results in {show_path(Path(run_dir) / 'results.json')} and the parent MLflow run")
    meta = read_json(Path(run_dir) / "run.json", None) or {}
    if meta.get("parent_run_id"):
        print(f"r1v: MLflow: {mlflow_link(meta)}")


def mlflow_link(meta: dict) -> str:
    """Where the run's parent MLflow run opens: its UI page (a tracking server), else the command that starts a UI
    on this machine's store and the page to open there."""
    uri = meta["tracking_uri"]
    if not is_local_store(uri):
        return ui_url(uri, meta["experiment_id"], meta["parent_run_id"])
    page = ui_url("http://127.0.0.1:5000", meta["experiment_id"], meta["parent_run_id"])
    return f"`mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000`, then {page}"


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(Runner.open(args.run))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove the run's superseded stage directories (under the run lock, so never while a driver works)."""
    import shutil

    run_dir, store = locate(args.run)
    with RunLock(run_dir, store):
        runner = Runner.open(args.run)
        aside = runner.superseded()
        if not aside:
            print(f"r1v: nothing superseded in {args.run}")
            return 0
        for a in aside:
            what = a.get("uri") or a["path"]
            print(f"{'would remove' if args.dry_run else 'removing'} {what} ({a['status']}, {_size(a['bytes'])})")
            if not args.dry_run:
                if a.get("uri"):
                    storage.delete_dir(a["uri"])
                shutil.rmtree(a["path"], ignore_errors=bool(a.get("uri")))
        total = _size(sum(a["bytes"] for a in aside))
        print(f"r1v: {'would free' if args.dry_run else 'freed'} {total} in {len(aside)} directories")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1v", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow YAML in a new run directory")
    run.add_argument("workflow")
    run.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    run.add_argument("--run-dir", help="run directory (default RUN_ROOT/NAME-TIMESTAMP)")
    run.add_argument("--only", nargs="+", help="run only these stages (their upstream must be current)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="print everything (Ray workers, progress bars) to the console instead of RUN/logs")
    run.set_defaults(fn=cmd_run)

    res = sub.add_parser("resume", help="resume a run: skip finished stages, restart failed ones from checkpoints")
    res.add_argument("run")
    res.add_argument("overrides", nargs="*", help="config overrides; stages whose results they change re-run from "
                     "scratch (their old directories are set aside, see `r1v gc`)")
    res.add_argument("--only", nargs="+", help="resume only these stages; refused while an upstream stage they read "
                     "is not current")
    res.add_argument("--with-needs", action="store_true",
                     help="with --only: also run the upstream stages that are not current, first")
    res.add_argument("--address", help="resume as a Ray job on this cluster (http://HEAD:8265); RUN is the path "
                     "the cluster sees")
    res.add_argument("--follow", action="store_true", help="with --address: print the job's log until it ends")
    res.add_argument("-v", "--verbose", action="store_true", help="print everything to the console")
    res.set_defaults(fn=cmd_resume)

    st = sub.add_parser("status", help="print each stage's state")
    st.add_argument("run")
    st.set_defaults(fn=cmd_status)

    add_submit_parsers(sub)

    gc = sub.add_parser("gc", help="remove a run's superseded stage directories (`r1v status` lists them)")
    gc.add_argument("run")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed")
    gc.set_defaults(fn=cmd_gc)

    add_data_parser(sub)

    ev = sub.add_parser("eval", help="evaluation: grade predictions or generate and grade")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    add_grade_parser(ev_sub)
    add_run_parser(ev_sub)
    add_world_parser(sub)
    add_model_parser(sub)
    add_export_parser(sub)
    add_plan_parser(sub)
    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, RunBusy) as e:
        print(f"r1v: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
