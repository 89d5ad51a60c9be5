"""The DAG engine: run stages in dependency order, skip finished ones, resume failed ones.

It knows nothing of ML. A stage runs its kind's function `(ctx, config) -> {output name: path}` (the catalogue
`r1v.workflow.kinds`). A stage is *current* when its state says done under the fingerprint its config has now
(`r1v.workflow.fingerprint`: what changes results, not logging or worker counts), its outputs exist, and every
upstream stage it read is current with the fingerprint it read. `resume` skips current stages and re-enters a
failed one with its working directory (and so its checkpoints) intact. Nothing is deleted: a stage whose
fingerprint changed is moved aside to RUN/superseded/ before it re-runs, until `r1v gc` removes it.

Run directory layout::

    RUN/run.json            name, MLflow ids, creation time
    RUN/workflow.yaml       the resolved config (after overrides) that resume uses
    RUN/events.jsonl        one line per stage event (started, skipped, finished, failed)
    RUN/stages/NAME/        the stage's working dir: state.json, checkpoints, outputs
    RUN/superseded/NAME-FP/ a stage's earlier directory, set aside when its fingerprint FP changed
    RUN/.lock, driver.json  the driver that holds the run (r1v.workflow.lock)
    RUN/logs/               console output of `r1v run/resume`: driver.log, NAME.log per stage (r1v.workflow.console)

With an object-store run root (`s3://bucket/prefix`, `r1v.core.storage`) the store holds the run and the driver
works in a node-local mirror of it (`storage.mirror_dir`), synced at stage boundaries: opening a run pulls its
records and every stage's state; a stage that resumes pulls its own directory; a finished or failed stage's
directory is uploaded (with its manifest) before the state that declares it is written, so a reader that sees
`done` finds every output. Outputs are recorded as URIs; a stage reading one gets a node-local copy
(`storage.stage_local`, checksummed, once per node). See docs/storage.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from r1v.core import storage
from r1v.core.config import ConfigError
from r1v.core.fs import atomic_write_json, atomic_write_text, read_json
from r1v.core.overrides import apply_overrides
from r1v.workflow import kinds, progress, tracking
from r1v.workflow.console import StageReporter
from r1v.workflow.fingerprint import SCHEME, combine
from r1v.workflow.lock import holder_alive
from r1v.workflow.refs import REF, order, walk
from r1v.workflow.schema import Workflow, read_yaml, stage_deps, validate_workflow


class StageFailed(RuntimeError):
    def __init__(self, stage: str, run_dir: Path | str, cause: BaseException) -> None:
        self.stage, self.run_dir, self.cause = stage, run_dir, cause
        super().__init__(f"stage {stage!r} failed: {cause!r}\n  fix the cause, then: r1v resume {run_dir}")


@dataclass
class StageContext:
    """What a stage function gets besides its config: where to work and where to log."""

    name: str
    kind: str
    run_dir: Path
    stage_dir: Path
    attempt: int
    tracking_uri: str
    mlflow_run_id: str
    upstream: dict[str, dict[str, str]] = field(default_factory=dict)
    stage_uri: str | None = None
    """Where the stage's directory lives in an object-store run root (None for a path): what Ray Train workers
    on other nodes write to, since they cannot see the driver's `stage_dir`."""
    _log: tracking.RunLogger | None = field(default=None, repr=False)
    _progress: progress.Progress | None = field(default=None, repr=False)

    @property
    def log(self) -> tracking.RunLogger:
        """One logger per stage: its buffer and failure count live as long as the stage."""
        if self._log is None:
            self._log = tracking.RunLogger(self.tracking_uri, self.mlflow_run_id)
        return self._log

    @property
    def progress_dir(self) -> str:
        """Where the stage's progress file goes: its URI in an object-store run root, else its directory (what a
        Ray Train worker gets as `stage_uri` / `stage_dir` and hands to `r1v.workflow.progress.Progress`)."""
        return self.stage_uri or str(self.stage_dir)

    def progress(self, step: float, total: float | None, unit: str = "step", **metrics: float | None) -> None:
        """Report that `step` of `total` units are done, with the stage's key metrics so far (loss, reward,
        accuracy): shown on the console's stage line, in `r1v status`, and as `progress/*` MLflow metrics.
        Call it as often as convenient: the file is written at most every few seconds (and at the last step)."""
        if self._progress is None:
            self._progress = progress.Progress(self.progress_dir, self.log, unit=unit)
        self._progress.unit = unit
        self._progress.update(step, total, **metrics)

    def path(self, *parts: str) -> Path:
        p = self.stage_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def event(self, event: str, **info: Any) -> None:
        _append_event(self.run_dir, self.name, event, **info)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _append_event(run_dir: Path, stage: str, event: str, **info: Any) -> None:
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({"time": _now(), "stage": stage, "event": event, **info}) + "\n")


def _elapsed(state: dict[str, Any]) -> float | None:
    """Seconds since a running stage's attempt started."""
    try:
        return round((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(state["started_at"])).total_seconds(), 1)
    except (KeyError, TypeError, ValueError):
        return None


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def topo_order(wf: Workflow) -> list[str]:
    """The stages in run order (the workflow was checked for cycles when it was validated)."""
    return order(stage_deps(wf.config, wf.stage_configs), wf.source)


RUN_FILES = ("run.json", "workflow.yaml", "events.jsonl", "driver.json")
"""The run-level records a mirror pulls from the store (beside each stage's state.json)."""
PUSHED = ("run.json", "workflow.yaml", "events.jsonl", "results.json", "results.txt", "results.png")


STORE_NOTE = ".r1v-store"
"""In a mirror: the URI of the run it mirrors, so that opening the mirror's path opens the run in the store."""


def locate(run: str | Path) -> tuple[Path, str | None]:
    """(the local directory to work in, the run's URI or None): a path is its own; a URI has a mirror."""
    if storage.is_uri(str(run)):
        uri = str(run).rstrip("/")
        return storage.mirror_dir(uri), uri
    note = Path(run) / STORE_NOTE
    return Path(run), (note.read_text().strip() if note.is_file() else None)


def pull_records(mirror: Path, uri: str) -> None:
    """Make the mirror's run records and stage states those of the store (the store is the truth)."""
    mirror.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mirror / STORE_NOTE, uri + "\n")
    for name in RUN_FILES:
        data = storage.get_bytes(storage.join(uri, name))
        if data is None:
            (mirror / name).unlink(missing_ok=True)
        else:
            atomic_write_text(mirror / name, data.decode())
    stored = set(storage.list_dirs(storage.join(uri, "stages")))
    for name in stored:
        data = storage.get_bytes(storage.join(uri, "stages", name, "state.json"))
        if data is not None:
            atomic_write_text(mirror / "stages" / name / "state.json", data.decode())
    for d in (mirror / "stages").iterdir() if (mirror / "stages").is_dir() else ():
        if d.name not in stored:
            (d / "state.json").unlink(missing_ok=True)


class Runner:
    """Runs or resumes one workflow in one run directory."""

    def __init__(self, wf: Workflow, run_dir: Path, store: str | None = None) -> None:
        self.wf = wf
        self.deps = stage_deps(wf.config, wf.stage_configs)  # {stage: what it needs or refers to}
        self.run_dir = run_dir.resolve()  # workers run in other cwds: every path they get is absolute
        self.store = store
        """The run's URI in an object store (the truth; `run_dir` is then this node's mirror), or None."""
        self.meta = read_json(run_dir / "run.json", {})
        self.console: StageReporter = StageReporter()  # the CLI sets an r1v.workflow.console.Console: lines and logs
        self.before_stage: Callable[[kinds.StageKind], None] | None = None  # the CLI's: starts Ray on first need

    # ----------------------------------------------------------------- creation / loading
    @classmethod
    def create(cls, wf: Workflow, run_dir: Path | str | None = None) -> Runner:
        if storage.is_uri(wf.config.run_root) or storage.is_uri(str(run_dir or "")):
            return cls._create_in_store(wf, str(run_dir) if run_dir else None)
        root = Path(wf.config.run_root)
        run_dir = Path(run_dir) if run_dir is not None else None
        if run_dir is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = root / f"{wf.config.name}-{stamp}"
            i = 1
            while run_dir.exists():
                run_dir = root / f"{wf.config.name}-{stamp}-{i}"
                i += 1
        if run_dir.exists() and any(run_dir.iterdir()):
            what = (f"a run: `r1v resume {run_dir}` continues it" if (run_dir / "run.json").exists()
                    else "not empty")
            raise ConfigError(f"run directory {run_dir} already exists and is {what}; choose a new one")
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = wf.config.tracking.tracking_uri or tracking.default_tracking_uri(root)
        # a server keeps artifacts where it was told to (--serve-artifacts); a local store beside the runs
        artifacts = root.resolve() / "mlartifacts" if tracking.is_local_store(uri) else None
        cls._start(wf, run_dir, str(run_dir.resolve()), uri, artifacts)
        return cls(wf, run_dir)

    @staticmethod
    def _start(wf: Workflow, run_dir: Path, where: str, uri: str, artifacts: Path | None) -> None:
        """Write the run's workflow.yaml and run.json and open its parent MLflow run."""
        atomic_write_text(run_dir / "workflow.yaml", yaml.safe_dump(wf.raw, sort_keys=False))
        exp = tracking.ensure_experiment(uri, wf.config.tracking.experiment, artifacts)
        parent = tracking.start_run(uri, exp, run_dir.name, tags={"r1v.run_dir": where,
                                                                  tracking.NOTE_TAG: run_note(wf, where)})
        log = tracking.RunLogger(uri, parent)
        log.params(wf.raw)
        log.text(yaml.safe_dump(wf.raw, sort_keys=False), "workflow.yaml")
        meta = {"name": run_dir.name, "created": _now(), "tracking_uri": uri, "experiment_id": exp,
                "parent_run_id": parent, "source": wf.source}
        atomic_write_json(run_dir / "run.json", meta)

    @classmethod
    def _create_in_store(cls, wf: Workflow, run_uri: str | None) -> Runner:
        uri = wf.config.tracking.tracking_uri
        if tracking.is_local_store(uri):
            raise ConfigError(f"run_root {wf.config.run_root} is an object store, which an MLflow SQLite database "
                              f"cannot live in (tracking.tracking_uri is {uri or 'unset: SQLite under run_root'}): "
                              "start an MLflow tracking server (docs/cluster.md) and set "
                              "tracking.tracking_uri=http://HOST:PORT")
        root = wf.config.run_root.rstrip("/")
        if run_uri is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_uri, i = f"{root}/{wf.config.name}-{stamp}", 1
            while storage.list_files(run_uri):
                run_uri, i = f"{root}/{wf.config.name}-{stamp}-{i}", i + 1
        run_uri = run_uri.rstrip("/")
        if storage.list_files(run_uri):
            what = (f"a run: `r1v resume {run_uri}` continues it" if storage.exists(storage.join(run_uri, "run.json"))
                    else "not empty")
            raise ConfigError(f"run directory {run_uri} already exists and is {what}; choose a new one")
        mirror, _ = locate(run_uri)
        if mirror.exists():  # left by a run of the same name whose objects were deleted: the store decides
            import shutil

            shutil.rmtree(mirror)
        mirror.mkdir(parents=True)
        atomic_write_text(mirror / STORE_NOTE, run_uri + "\n")
        cls._start(wf, mirror, run_uri, uri, None)
        runner = cls(wf, mirror, run_uri)
        runner.push_records()
        return runner

    @classmethod
    def open(cls, run: Path | str, overrides: list[str] | None = None) -> Runner:
        """The run as RUN/workflow.yaml has it, with `overrides` applied in memory only: `commit_overrides`
        stores them once the caller has checked what they imply (a bad override leaves the run as it was).
        `run` may be an object-store URI: its records are pulled into this node's mirror first."""
        run_dir, store = locate(run)
        if store is not None:
            pull_records(run_dir, store)
        if not (run_dir / "run.json").exists():
            raise FileNotFoundError(f"{run_dir} is not an r1v run directory (no run.json)")

        source = run_dir / "workflow.yaml"
        raw = read_yaml(source)
        if overrides:
            raw = apply_overrides(raw, overrides)
        runner = cls(validate_workflow(raw, str(source)), run_dir, store)
        runner._pending = (raw, list(overrides)) if overrides else None
        return runner

    def commit_overrides(self) -> None:
        """Store the overrides `open` applied into RUN/workflow.yaml and the run's history (events, MLflow)."""
        pending = getattr(self, "_pending", None)
        if not pending:
            return
        raw, overrides = pending
        atomic_write_text(self.run_dir / "workflow.yaml", yaml.safe_dump(raw, sort_keys=False))
        _append_event(self.run_dir, "", "overrides", overrides=overrides)
        self.push_records()
        meta = self.meta
        if meta.get("tracking_uri") and meta.get("parent_run_id"):
            n = sum(1 for e in read_events(self.run_dir) if e["event"] == "overrides")
            tracking.RunLogger(meta["tracking_uri"], meta["parent_run_id"]).text(
                "\n".join(overrides) + "\n", f"overrides/resume-{n:03d}.txt")
        self._pending = None

    # ----------------------------------------------------------------- state
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    @property
    def where(self) -> Path | str:
        """What names the run to a user: its URI in an object store, else its directory."""
        return self.store or self.run_dir

    def stage_uri(self, name: str) -> str | None:
        return storage.join(self.store, "stages", name) if self.store else None

    def state(self, name: str) -> dict[str, Any]:
        return read_json(self.stage_dir(name) / "state.json", {}) or {}

    def _save_state(self, name: str, state: dict[str, Any]) -> None:
        atomic_write_json(self.stage_dir(name) / "state.json", state)
        if self.store:  # after the stage's objects (`_push_stage`): a state read from the store is never ahead
            storage.put_json(storage.join(self.store, "stages", name, "state.json"), state)

    def push_records(self) -> None:
        """Upload the run-level records (run.json, events, results) and the console logs to the store."""
        if not self.store:
            return
        for name in PUSHED:
            if (self.run_dir / name).is_file():
                storage.upload_file(self.run_dir / name, storage.join(self.store, name))
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            storage.upload_file(log, storage.join(self.store, "logs", log.name))

    def _push_stage(self, name: str) -> None:
        """Upload the stage's directory (but its state, written after) with its manifest."""
        uri = self.stage_uri(name)
        if uri and self.stage_dir(name).is_dir():
            storage.upload_dir(self.stage_dir(name), uri, skip=storage.read_manifest(uri), exclude={"state.json"})

    def _pull_stage(self, name: str) -> None:
        """A resumed stage continues from what its last attempt uploaded (its finished parts; Ray Train reads its
        checkpoints, `ray/`, from the store itself)."""
        uri = self.stage_uri(name)
        if uri:
            storage.download_dir(uri, self.stage_dir(name), exclude={"state.json", "ray"})

    def fingerprints(self, scheme: int = SCHEME) -> dict[str, str]:
        """A stage's fingerprint covers its own config and its upstream stages' fingerprints."""
        cache = self.__dict__.setdefault("_fps", {})
        if scheme not in cache:
            out: dict[str, str] = {}
            for name in topo_order(self.wf):
                deps = sorted(self.deps[name])
                own = self.wf.fingerprint(name, scheme)
                out[name] = own if not deps else combine(own, *[out[d] for d in deps])
            cache[scheme] = out
        return cache[scheme]

    def expected(self, name: str, st: dict[str, Any]) -> str:
        """The fingerprint `name` must have been recorded with, under the scheme its state was written in."""
        return self.fingerprints(int(st.get("scheme", 1)))[name]

    def is_current(self, name: str, upstream: bool = True, _seen: dict[str, bool] | None = None) -> bool:
        """Done under today's config with its outputs present, and (`upstream`) every upstream stage it read
        still current and as it was read."""
        if not upstream:
            return self._why_not_current(name, None, upstream=False) is None
        seen = {} if _seen is None else _seen
        if name not in seen:
            seen[name] = self._why_not_current(name, seen) is None
        return seen[name]

    def _why_not_current(self, name: str, seen: dict[str, bool] | None = None, upstream: bool = True) -> str | None:
        st = self.state(name)
        if st.get("status") != "done":
            return st.get("status", "pending")
        if st.get("fingerprint") != self.expected(name, st):
            return "its config changed"
        if not all(storage.exists(p) for p in st.get("outputs", {}).values()):
            return "an output is missing"
        read = st.get("inputs", {})
        for dep in sorted(self.deps[name]) if upstream else ():
            if not self.is_current(dep, _seen=seen):
                return f"upstream {dep} is not current"
            if dep in read and read[dep] != self.state(dep).get("fingerprint"):
                return f"upstream {dep} changed since it read it"
        return None

    def superseded(self) -> list[dict[str, Any]]:
        """Directories set aside when a stage's fingerprint changed, oldest first."""
        if self.store:
            return self._superseded_in_store()
        root = self.run_dir / "superseded"
        rows = []
        for d in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime) if root.is_dir() else []:
            st = read_json(d / "state.json", {}) or {}
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
            rows.append({"path": d, "stage": st.get("stage", d.name.rsplit("-", 1)[0]),
                         "fingerprint": st.get("fingerprint"), "status": st.get("status"), "bytes": size})
        return rows

    def _superseded_in_store(self) -> list[dict[str, Any]]:
        root = storage.join(self.store or "", "superseded")
        rows = []
        for name in storage.list_dirs(root):
            uri = storage.join(root, name)
            st = storage.read_json(storage.join(uri, "state.json"), {}) or {}
            rows.append({"path": self.run_dir / "superseded" / name, "uri": uri,
                         "stage": st.get("stage", name.rsplit("-", 1)[0]), "fingerprint": st.get("fingerprint"),
                         "status": st.get("status"), "bytes": sum(storage.list_files(uri).values()),
                         "ended": st.get("ended_at") or ""})
        return sorted(rows, key=lambda r: r["ended"])

    def status_rows(self) -> list[dict[str, Any]]:
        alive: bool | None = None
        rows = []
        for name in topo_order(self.wf):
            st = self.state(name)
            status = st.get("status", "pending")
            why = ""
            if status == "done":
                why = self._why_not_current(name) or ""
                status = "stale" if why else "done"
            elif status == "running":
                if alive is None:
                    alive = holder_alive(self.run_dir)
                status = "running" if alive else "interrupted"
            elif status == "failed" and st.get("interrupted"):
                status = "interrupted"  # stopped by a signal (Ctrl-C, `r1v stop`), not by its own error
            shown = status in ("running", "interrupted") or (status == "failed" and st.get("interrupted"))
            rows.append({"stage": name, "kind": self.wf.config.stages[name].kind, "status": status,
                         "attempts": st.get("attempts", 0),
                         "seconds": _elapsed(st) if status == "running" else st.get("seconds"),
                         "error": [why] if why else (st.get("error") or "").splitlines()[-1:] or [""],
                         "progress": progress.describe(progress.read(self.progress_where(name))) if shown else ""})
        return rows

    def plan(self, only: list[str] | None = None, with_needs: bool = False) -> list[str]:
        """The stages `run` will run, in order: those selected that are not current. With `only`, a selected
        stage's upstream that is not current refuses (ConfigError naming it) or, `with_needs`, joins the run."""
        selected = set(only or self.wf.config.stages)
        if only:
            stale: list[tuple[str, str, str]] = []

            def visit(n: str) -> None:
                for dep in sorted(self.deps[n]):
                    if dep in selected or self.is_current(dep):
                        continue
                    if with_needs:
                        selected.add(dep)
                        visit(dep)
                    else:
                        stale.append((n, dep, self._why_not_current(dep) or ""))

            for n in list(selected):
                visit(n)
            if stale:
                lines = [f"  {n} reads {dep}, which is not current ({why})" for n, dep, why in stale]
                raise ConfigError("--only: a selected stage would read outputs that do not belong to this "
                                  "config:\n" + "\n".join(lines) + "\nrun them too (--only "
                                  + " ".join(sorted({d for _, d, _ in stale} | set(only))) + ") or add "
                                  "--with-needs")
        return [n for n in topo_order(self.wf) if n in selected and not self.is_current(n)]

    # ----------------------------------------------------------------- running
    def _resolve(self, name: str, cfg: BaseModel) -> BaseModel:
        def sub(s: str) -> str:
            m = REF.match(s)
            if not m:
                return s
            stage, out = m.groups()
            outputs = self.state(stage).get("outputs", {})
            if out not in outputs:
                raise ConfigError(f"stages.{name}: {s} - stage {stage!r} has no output {out!r} "
                                  f"(it has {sorted(outputs)})")
            # an object-store output is read from this node's checked copy; a worker on another node that is
            # handed this path stages it there the same way (`storage.stage_local`)
            return str(storage.stage_local(outputs[out])) if storage.is_uri(outputs[out]) else outputs[out]

        return type(cfg).model_validate(walk(cfg.model_dump(mode="json"), sub))

    def run(self, only: list[str] | None = None, with_needs: bool = False) -> dict[str, str]:
        """Run every selected stage that is not current; returns {stage: 'ran' | 'skipped'}."""
        check_only(self.wf, only)
        to_run = self.plan(only, with_needs)
        self.commit_overrides()  # checked by now: validated at open, and --only's upstream above
        meta = self.meta
        uri, parent = meta["tracking_uri"], meta["parent_run_id"]
        fps = self.fingerprints()
        order = [n for n in topo_order(self.wf) if not only or n in only or n in to_run]
        self._announce(to_run, fps)
        tracking.set_status(uri, parent, "RUNNING")
        self.push_records()
        what: dict[str, str] = {}
        with _terminate_as_interrupt():
            try:
                for i, name in enumerate(order, 1):
                    kind = self.wf.config.stages[name].kind
                    if name not in to_run:
                        self._upgrade_scheme(name, fps)
                        what[name] = "skipped"
                        _append_event(self.run_dir, name, "skipped", fingerprint=fps[name])
                        self.console.skipped(name, kind, i, len(order))
                        continue
                    with self.console.stage(name, kind, i, len(order), watch=self._watch(name)):
                        self._run_stage(name, fps[name])
                    what[name] = "ran"
            except BaseException as e:
                killed = isinstance(e, KeyboardInterrupt | SystemExit) or isinstance(getattr(e, "cause", None),
                                                                                    KeyboardInterrupt | SystemExit)
                tracking.set_status(uri, parent, "KILLED" if killed else "FAILED")
                raise
            finally:
                kinds.release_idle_engines(None)
                self.push_records()
        tracking.set_status(uri, parent, "FINISHED")
        return what

    def progress_where(self, name: str) -> str:
        return self.stage_uri(name) or str(self.stage_dir(name))

    def _watch(self, name: str) -> Callable[[], str]:
        """What the console shows of a running stage besides its elapsed time: its progress line."""
        where = self.progress_where(name)
        return lambda: progress.describe(progress.read(where))

    def _announce(self, to_run: list[str], fps: dict[str, str]) -> None:
        """Before anything runs: which stages will run and which directories are set aside (resume only)."""
        aside = [(n, st) for n in to_run if (st := self.state(n)) and st.get("fingerprint") != self.expected(n, st)]
        if not to_run or not any(self.state(n) for n in self.wf.config.stages):
            return  # nothing to run, or a new run where everything runs: the stage lines say it
        self.console.line(f"r1v: will run {len(to_run)} stage(s): {', '.join(to_run) or 'none'}")
        for n, st in aside:
            self.console.line(f"r1v: sets aside stages/{n} ({st.get('status')}, fingerprint {st.get('fingerprint')})"
                              f" -> superseded/ (kept until `r1v gc {self.where}`)")

    def _upgrade_scheme(self, name: str, fps: dict[str, str]) -> None:
        """A current stage recorded under an older fingerprint scheme is re-recorded under today's."""
        st = self.state(name)
        if st.get("scheme", 1) == SCHEME:
            return
        st.update(scheme=SCHEME, fingerprint=fps[name], legacy_fingerprint=st.get("fingerprint"),
                  inputs={d: self.state(d).get("fingerprint") for d in sorted(self.deps[name])})
        self._save_state(name, st)

    def _set_aside(self, name: str, prev: dict[str, Any]) -> Path:
        """Move a stage's directory out of the way, named by the fingerprint it was made under."""
        root = self.run_dir / "superseded"
        root.mkdir(exist_ok=True)
        taken = {r["path"].name for r in self.superseded()} if self.store else set()
        dest = root / f"{name}-{prev.get('fingerprint', 'unknown')}"
        i = 2
        while dest.exists() or dest.name in taken:
            dest = root / f"{name}-{prev.get('fingerprint', 'unknown')}-{i}"
            i += 1
        if self.store:
            # copied (manifest last), then deleted: a reader in between sees the stage as it was or its outputs
            # missing (not current), never another config's outputs as current
            src, to = self.stage_uri(name) or "", storage.join(self.store, "superseded", dest.name)
            storage.move_dir(src, to)
        if self.stage_dir(name).exists():
            os.replace(self.stage_dir(name), dest)
        _append_event(self.run_dir, name, "set_aside", fingerprint=prev.get("fingerprint"), to=str(dest))
        return dest

    def _run_stage(self, name: str, fingerprint: str) -> None:
        spec = self.wf.config.stages[name]
        sdir = self.stage_dir(name)
        prev = self.state(name)
        if prev and prev.get("fingerprint") != self.expected(name, prev):
            # Another config's checkpoints must not be resumed from; its results stay until `r1v gc`.
            self._set_aside(name, prev)
            prev = {}
        sdir.mkdir(parents=True, exist_ok=True)
        if prev and kinds.get(spec.kind).resumable:
            self._pull_stage(name)  # this node's mirror may not have what the last attempt left
        uri, exp = self.meta["tracking_uri"], self.meta["experiment_id"]
        progress.clear(self.stage_dir(name))  # this attempt's progress, not the last one's
        if self.store:
            progress.clear(self.progress_where(name))
        child = prev.get("mlflow_run_id") or tracking.try_start_run(
            uri, exp, name, parent_run_id=self.meta["parent_run_id"],
            tags={"r1v.stage_kind": spec.kind, tracking.NOTE_TAG: self._stage_note(name, spec.kind)})
        tracking.set_status(uri, child, "RUNNING")
        attempt = int(prev.get("attempts", 0)) + 1
        deps = self.deps[name]
        state = {"status": "running", "stage": name, "kind": spec.kind, "scheme": SCHEME, "fingerprint": fingerprint,
                 "inputs": {d: self.state(d).get("fingerprint") for d in sorted(deps)}, "mlflow_run_id": child,
                 "attempts": attempt, "started_at": _now(), "driver": {"pid": os.getpid(),
                                                                        "host": socket.gethostname()},
                 "outputs": {}}
        self._save_state(name, state)
        _append_event(self.run_dir, name, "started", attempt=attempt, fingerprint=fingerprint)
        ctx = StageContext(name=name, kind=spec.kind, run_dir=self.run_dir, stage_dir=sdir, attempt=attempt,
                           tracking_uri=uri, mlflow_run_id=child,
                           upstream={d: self.state(d).get("outputs", {}) for d in deps},
                           stage_uri=self.stage_uri(name))
        t0 = time.time()
        try:
            kinds.release_idle_engines(spec.kind)
            kind = kinds.get(spec.kind)
            if self.before_stage is not None:
                self.before_stage(kind)
            if kind.resumable and attempt > 1:
                ctx.event("resuming", attempt=attempt)
            cfg = self._resolve(name, self.wf.stage_configs[name])
            if attempt == 1:
                ctx.log.params(cfg.model_dump(mode="json"))
                ctx.log.text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
            outputs = kind.run_function()(ctx, cfg)
            if ctx._progress is not None:
                ctx._progress.flush()
            missing = [k for k, p in outputs.items() if not storage.exists(str(p))]
            if missing:
                raise RuntimeError(f"stage returned outputs {missing} that were not written")
            published = self._publish(name, outputs)
        except BaseException as e:
            # SystemExit: Ray's driver turns SIGTERM (`r1v stop`, `ray job stop`) into sys.exit once it has started
            killed = isinstance(e, KeyboardInterrupt | SystemExit)
            state.update(status="failed", interrupted=killed, ended_at=_now(), seconds=round(time.time() - t0, 1),
                         error="".join(traceback.format_exception_only(type(e), e)).strip()
                         or ("interrupted (SIGTERM or SIGINT)" if killed else type(e).__name__))
            try:
                self._push_stage(name)  # its checkpoints and finished parts, for the next attempt on any node
            except Exception as push_error:  # the stage's own error is the one to report
                state["error"] += f"\n(its directory could not be uploaded: {push_error!r})"
            self._save_state(name, state)
            _append_event(self.run_dir, name, "failed", attempt=attempt, error=state["error"][-500:])
            tracking.set_status(uri, child, "KILLED" if killed else "FAILED")
            if not killed:  # a stop is answered at once
                self._curves_to_parent(name, child)
            raise StageFailed(name, self.where, e) from e
        secs = round(time.time() - t0, 1)
        ctx.log.metrics({"stage_seconds": secs}, step=0)
        ctx.log.flush()
        state.update(status="done", ended_at=_now(), seconds=secs, outputs=published)
        if ctx.log.failures or ctx.log.dropped:
            state.update(tracking_failures=ctx.log.failures, tracking_dropped=ctx.log.dropped)
        self._save_state(name, state)
        tracking.set_status(uri, child, "FINISHED")
        _append_event(self.run_dir, name, "finished", attempt=attempt, seconds=secs)
        self._curves_to_parent(name, child)

    def _curves_to_parent(self, name: str, child: str | None) -> None:
        """The stage's key metrics (those its progress reported) as `NAME/KEY` curves on the parent run, so that
        the parent shows every stage's curve side by side. Best effort, like all tracking."""
        try:
            keys = list((progress.read(self.progress_where(name)) or {}).get("metrics") or {})
            if keys and child:
                parent = tracking.RunLogger(self.meta["tracking_uri"], self.meta["parent_run_id"])
                parent.copy_metrics(child, keys, name)
        except Exception as e:  # tracking never fails a stage
            print(f"r1v: MLflow: {name}'s curves not copied to the parent run ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)

    def _stage_note(self, name: str, kind: str) -> str:
        return (f"Stage `{name}` (kind `{kind}`) of the r1v run `{self.where}`.\n\n"
                f"Progress while it runs: `r1v status {self.where}`. If it fails or is stopped: "
                f"`r1v resume {self.where}` continues it (from its last checkpoint, for a resumable kind).")


    def _publish(self, name: str, outputs: dict[str, Any]) -> dict[str, str]:
        """The outputs to record: absolute paths, or, with an object-store run root, the URIs of their objects,
        uploaded (the stage's whole directory, manifest last) before the caller records the state."""
        stored = {k: str(p) for k, p in outputs.items() if storage.is_uri(str(p))}  # written there by workers
        local = {k: Path(p).resolve() for k, p in outputs.items() if k not in stored}
        if not self.store:
            return {k: str(p) for k, p in local.items()} | stored
        sdir, suri = self.stage_dir(name).resolve(), self.stage_uri(name) or ""
        outside = [k for k, p in local.items() if not p.is_relative_to(sdir)]
        outside += [k for k, u in stored.items() if not u.startswith(suri + "/")]
        if outside:
            raise RuntimeError(f"stage outputs {outside} lie outside the stage's directory {sdir}: with an "
                               "object-store run root a stage writes its outputs under its directory")
        self._push_stage(name)
        return {k: storage.join(suri, *p.relative_to(sdir).parts) for k, p in local.items()} | stored


def run_note(wf: Workflow, where: str) -> str:
    """The parent MLflow run's description: what the workflow is and how to watch, resume and read it."""
    names = topo_order(wf)
    stages = "\n".join(f"{i}. `{n}` ({wf.config.stages[n].kind})" for i, n in enumerate(names[:100], 1))
    if len(names) > 100:
        stages += f"\n\n... and {len(names) - 100} more (`r1v status {where}` lists them all)"
    return (f"**r1v workflow `{wf.config.name}`** (from `{wf.source}`), run directory `{where}`.\n\n"
            f"Stages, in order (each is a child run with its params, metrics and artifacts):\n\n{stages}\n\n"
            f"- progress: `r1v status {where}`\n"
            f"- resume after a failure, a stop or a config change (finished stages are skipped): "
            f"`r1v resume {where}`\n"
            f"- the results table (when evals report rows): `results/` artifacts of this run, "
            f"`{where}/results.txt`\n\n"
            "The workflow as run is the `workflow.yaml` artifact; overrides given to `resume` are under "
            "`overrides/`.")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the driver's main thread so that the running stage is recorded failed and its MLflow
    run ends KILLED, as Ctrl-C does."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check_only(wf: Workflow, only: list[str] | None) -> None:
    """`--only` names stages of `wf`: an unknown name would otherwise select nothing, silently (argparse hands
    `--only a x=1` the override too)."""
    unknown = [n for n in only or [] if n not in wf.config.stages]
    if unknown:
        hint = ("; overrides (key=value) go before --only, which takes every word after it"
                if any("=" in n for n in unknown) else "")
        raise ConfigError(f"--only: no stage named {', '.join(map(repr, unknown))} in this workflow (its stages: "
                          f"{', '.join(topo_order(wf))}){hint}")
