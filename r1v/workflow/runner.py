"""The DAG engine: run stages in dependency order, skip finished ones, resume failed ones.

It knows nothing of ML. A stage runs its kind's function `(ctx, config) -> {output name: path}` (the catalogue
`r1v.workflow.kinds`). A stage is
*done* when its state record says so with the same config fingerprint and its outputs exist; `resume` skips
done stages and re-enters a failed one with its working directory (and so its checkpoints) intact.

Run directory layout::

    RUN/run.json            name, MLflow ids, creation time
    RUN/workflow.yaml       the resolved config (after overrides) that resume uses
    RUN/events.jsonl        one line per stage event (started, skipped, finished, failed)
    RUN/stages/NAME/        the stage's working dir: state.json, checkpoints, outputs
    RUN/logs/               console output of `r1v run/resume`: driver.log, NAME.log per stage (r1v.workflow.console)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from r1v.core.config import ConfigError
from r1v.core.fs import atomic_write_json, atomic_write_text, read_json
from r1v.core.overrides import apply_overrides
from r1v.workflow import kinds, tracking
from r1v.workflow.console import StageReporter
from r1v.workflow.refs import REF, order, walk
from r1v.workflow.schema import Workflow, read_yaml, stage_deps, validate_workflow


class StageFailed(RuntimeError):
    def __init__(self, stage: str, run_dir: Path, cause: BaseException) -> None:
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

    @property
    def log(self) -> tracking.RunLogger:
        return tracking.RunLogger(self.tracking_uri, self.mlflow_run_id)

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


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def topo_order(wf: Workflow) -> list[str]:
    """The stages in run order (the workflow was checked for cycles when it was validated)."""
    return order(stage_deps(wf.config, wf.stage_configs), wf.source)


class Runner:
    """Runs or resumes one workflow in one run directory."""

    def __init__(self, wf: Workflow, run_dir: Path) -> None:
        self.wf = wf
        self.deps = stage_deps(wf.config, wf.stage_configs)  # {stage: what it needs or refers to}
        self.run_dir = run_dir.resolve()  # workers run in other cwds: every path they get is absolute
        self.meta = read_json(run_dir / "run.json", {})
        self.console: StageReporter = StageReporter()  # the CLI sets an r1v.workflow.console.Console: lines and logs

    # ----------------------------------------------------------------- creation / loading
    @classmethod
    def create(cls, wf: Workflow, run_dir: Path | None = None) -> Runner:
        root = Path(wf.config.run_root)
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
        atomic_write_text(run_dir / "workflow.yaml", yaml.safe_dump(wf.raw, sort_keys=False))
        uri = wf.config.tracking.tracking_uri or tracking.default_tracking_uri(root)
        exp = tracking.ensure_experiment(uri, wf.config.tracking.experiment, root.resolve() / "mlartifacts")
        parent = tracking.start_run(uri, exp, run_dir.name, tags={"r1v.run_dir": str(run_dir.resolve())})
        log = tracking.RunLogger(uri, parent)
        log.params(wf.raw)
        log.text(yaml.safe_dump(wf.raw, sort_keys=False), "workflow.yaml")
        meta = {"name": run_dir.name, "created": _now(), "tracking_uri": uri, "experiment_id": exp,
                "parent_run_id": parent, "source": wf.source}
        atomic_write_json(run_dir / "run.json", meta)
        return cls(wf, run_dir)

    @classmethod
    def open(cls, run_dir: Path, overrides: list[str] | None = None) -> Runner:
        if not (run_dir / "run.json").exists():
            raise FileNotFoundError(f"{run_dir} is not an r1v run directory (no run.json)")

        source = run_dir / "workflow.yaml"
        raw = read_yaml(source)
        wf = validate_workflow(apply_overrides(raw, overrides) if overrides else raw, str(source))
        if overrides:  # validated first: a bad override leaves the run as it was
            raw = apply_overrides(raw, overrides)
            atomic_write_text(source, yaml.safe_dump(raw, sort_keys=False))
            _append_event(run_dir, "", "overrides", overrides=list(overrides))
        return cls(wf, run_dir)

    # ----------------------------------------------------------------- state
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def state(self, name: str) -> dict[str, Any]:
        return read_json(self.stage_dir(name) / "state.json", {}) or {}

    def _save_state(self, name: str, state: dict[str, Any]) -> None:
        atomic_write_json(self.stage_dir(name) / "state.json", state)

    def fingerprints(self) -> dict[str, str]:
        """A stage's fingerprint covers its own config and its upstream stages' fingerprints."""
        out: dict[str, str] = {}
        for name in topo_order(self.wf):
            deps = sorted(self.deps[name])
            own = self.wf.fingerprint(name)
            out[name] = own if not deps else combine_hash(own, *[out[d] for d in deps])
        return out

    def is_done(self, name: str, fingerprint: str) -> bool:
        st = self.state(name)
        if st.get("status") != "done" or st.get("fingerprint") != fingerprint:
            return False
        return all(Path(p).exists() for p in st.get("outputs", {}).values())

    def status_rows(self) -> list[dict[str, Any]]:
        fps = self.fingerprints()
        rows = []
        for name in topo_order(self.wf):
            st = self.state(name)
            status = st.get("status", "pending")
            if status == "done" and st.get("fingerprint") != fps[name]:
                status = "stale"
            rows.append({"stage": name, "kind": self.wf.config.stages[name].kind, "status": status,
                         "attempts": st.get("attempts", 0), "seconds": st.get("seconds"),
                         "error": (st.get("error") or "").splitlines()[-1:] or [""]})
        return rows

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
            return outputs[out]

        return type(cfg).model_validate(walk(cfg.model_dump(mode="json"), sub))

    def run(self, only: list[str] | None = None) -> dict[str, str]:
        """Run every stage not yet done; returns {stage: 'ran' | 'skipped'}."""
        check_only(self.wf, only)
        meta = self.meta
        uri, parent = meta["tracking_uri"], meta["parent_run_id"]
        tracking.set_status(uri, parent, "RUNNING")
        fps = self.fingerprints()
        what: dict[str, str] = {}
        order = [n for n in topo_order(self.wf) if not only or n in only]
        try:
            for i, name in enumerate(order, 1):
                kind = self.wf.config.stages[name].kind
                if self.is_done(name, fps[name]):
                    what[name] = "skipped"
                    _append_event(self.run_dir, name, "skipped", fingerprint=fps[name])
                    self.console.skipped(name, kind, i, len(order))
                    continue
                with self.console.stage(name, kind, i, len(order)):
                    self._run_stage(name, fps[name])
                what[name] = "ran"
        except BaseException:
            tracking.set_status(uri, parent, "FAILED")
            raise
        finally:
            kinds.release_idle_engines(None)
        tracking.set_status(uri, parent, "FINISHED")
        return what

    def _run_stage(self, name: str, fingerprint: str) -> None:
        spec = self.wf.config.stages[name]
        sdir = self.stage_dir(name)
        prev = self.state(name)
        if prev and prev.get("fingerprint") != fingerprint:
            # Config changed: old checkpoints belong to another config and must not be resumed from.
            shutil.rmtree(sdir, ignore_errors=True)
            prev = {}
        sdir.mkdir(parents=True, exist_ok=True)
        uri, exp = self.meta["tracking_uri"], self.meta["experiment_id"]
        child = prev.get("mlflow_run_id") or tracking.start_run(
            uri, exp, name, parent_run_id=self.meta["parent_run_id"], tags={"r1v.stage_kind": spec.kind})
        tracking.set_status(uri, child, "RUNNING")
        attempt = int(prev.get("attempts", 0)) + 1
        state = {"status": "running", "kind": spec.kind, "fingerprint": fingerprint, "mlflow_run_id": child,
                 "attempts": attempt, "started_at": _now(), "outputs": {}}
        self._save_state(name, state)
        _append_event(self.run_dir, name, "started", attempt=attempt, fingerprint=fingerprint)
        deps = self.deps[name]
        ctx = StageContext(name=name, kind=spec.kind, run_dir=self.run_dir, stage_dir=sdir, attempt=attempt,
                           tracking_uri=uri, mlflow_run_id=child,
                           upstream={d: self.state(d).get("outputs", {}) for d in deps})
        t0 = time.time()
        try:
            kinds.release_idle_engines(spec.kind)
            kind = kinds.get(spec.kind)
            if kind.resumable and attempt > 1:
                ctx.event("resuming", attempt=attempt)
            cfg = self._resolve(name, self.wf.stage_configs[name])
            if attempt == 1:
                ctx.log.params(cfg.model_dump(mode="json"))
                ctx.log.text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
            outputs = kind.run_function()(ctx, cfg)
            missing = [k for k, p in outputs.items() if not Path(p).exists()]
            if missing:
                raise RuntimeError(f"stage returned outputs {missing} that were not written")
        except BaseException as e:
            state.update(status="failed", ended_at=_now(), seconds=round(time.time() - t0, 1),
                         error="".join(traceback.format_exception_only(type(e), e)).strip())
            self._save_state(name, state)
            _append_event(self.run_dir, name, "failed", attempt=attempt, error=state["error"][-500:])
            tracking.set_status(uri, child, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise StageFailed(name, self.run_dir, e) from e
        secs = round(time.time() - t0, 1)
        state.update(status="done", ended_at=_now(), seconds=secs,
                     outputs={k: str(Path(p).resolve()) for k, p in outputs.items()})
        self._save_state(name, state)
        ctx.log.metrics({"stage_seconds": secs}, step=0)
        tracking.set_status(uri, child, "FINISHED")
        _append_event(self.run_dir, name, "finished", attempt=attempt, seconds=secs)


def check_only(wf: Workflow, only: list[str] | None) -> None:
    """`--only` names stages of `wf`: an unknown name would otherwise select nothing, silently (argparse hands
    `--only a x=1` the override too)."""
    unknown = [n for n in only or [] if n not in wf.config.stages]
    if unknown:
        hint = ("; overrides (key=value) go before --only, which takes every word after it"
                if any("=" in n for n in unknown) else "")
        raise ConfigError(f"--only: no stage named {', '.join(map(repr, unknown))} in this workflow (its stages: "
                          f"{', '.join(topo_order(wf))}){hint}")


def combine_hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
