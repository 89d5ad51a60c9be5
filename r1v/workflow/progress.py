"""Progress of a running stage: step / total, its key metrics so far, rate and ETA, in `STAGE/progress.json`.

One writer per stage (`Progress`): the driver's stage code through `StageContext.progress`, or rank 0 of a Ray
Train worker group, which gets the stage's directory (or, with an object-store run root, its URI: workers on other
nodes cannot see the driver's files) the way it already publishes its outputs. Readers are the console's stage
line (`r1v run`, and so a submitted job's `--follow`), `r1v status RUN` from any machine that sees the run, and
MLflow (`progress/*` metrics of the stage's run).

The file is written atomically (a rename; in a store, one PUT) and at most every `every_s` seconds
(`$R1V_PROGRESS_S`), but the first and the last step always: a loop may call `update` every step. Writing is
best effort: a failure is reported once on stderr and never stops the stage.

    {"step": 40, "total": 100, "unit": "step", "metrics": {"loss": 0.51}, "rate": 1.3, "eta_s": 46.2,
     "elapsed_s": 30.8, "time": 1700000000.0, "pid": 123, "host": "node-1"}

`rate` is units per second since this writer's first update (a resumed attempt starts counting at the step it
resumed from), `eta_s` the remaining units at that rate.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from r1v.core import storage
from r1v.core.fs import atomic_write_json

FILE = "progress.json"
EVERY_ENV = "R1V_PROGRESS_S"
"""Seconds between two writes of a stage's progress (default 5, or 15 to an object store; 0: every update)."""


def location(where: str | os.PathLike) -> str:
    """The progress file of a stage directory or stage URI."""
    return storage.join(str(where), FILE)


class Progress:
    """Writes a stage's progress file (and `progress/*` metrics through `log`, a `RunLogger`), rate-limited."""

    def __init__(self, where: str | os.PathLike, log: Any = None, every_s: float | None = None,
                 unit: str = "step") -> None:
        self.path = location(where)
        self.log = log
        if every_s is None:
            every_s = float(os.environ.get(EVERY_ENV) or (15.0 if storage.is_uri(self.path) else 5.0))
        self.every_s = every_s
        self.unit = unit
        self._first: tuple[float, float] | None = None  # (time, step) of the first update
        self._written = -math.inf
        self._skipped: tuple[float, float | None, dict[str, Any]] | None = None
        self.failed = False

    def update(self, step: float, total: float | None, force: bool = False, **metrics: float | None) -> bool:
        """Record that `step` of `total` units are done; whether the file was written now."""
        now = time.time()
        if self._first is None:
            self._first = (now, step)
        last = step == total  # not past it: an estimated total (SFT with packing) must not unthrottle the rest
        if not (force or last or now - self._written >= self.every_s):
            self._skipped = (step, total, metrics)
            return False
        self._written, self._skipped = now, None
        t0, s0 = self._first
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else None
        eta = (total - step) / rate if rate and total is not None else None
        data = {"step": step, "total": total, "unit": self.unit,
                "metrics": {k: float(v) for k, v in metrics.items() if _number(v)},
                "rate": rate, "eta_s": eta, "elapsed_s": now - t0, "time": now, "pid": os.getpid(),
                "host": socket.gethostname()}
        try:
            if storage.is_uri(self.path):
                storage.put_json(self.path, data)
            else:
                atomic_write_json(Path(self.path), data)
        except Exception as e:  # progress is for watching: it never stops the stage
            if not self.failed:
                print(f"r1v: could not write progress to {self.path} ({type(e).__name__}: {str(e)[:200]})",
                      file=sys.stderr, flush=True)
            self.failed = True
        if self.log is not None:
            values = {"progress/step": step, **({"progress/fraction": step / total} if total else {}),
                      **({"progress/rate": rate} if rate else {}), **({"progress/eta_s": eta} if eta else {}),
                      **{f"progress/{k}": v for k, v in data["metrics"].items()}}
            self.log.metrics(values, int(step))
        return True


    def flush(self) -> None:
        """Write the last update if the interval held it back (a loop that ends short of an estimated total)."""
        if self._skipped is not None:
            step, total, metrics = self._skipped
            self.update(step, total, force=True, **metrics)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read(where: str | os.PathLike) -> dict[str, Any] | None:
    """The progress a stage directory or stage URI holds, None when it has none (or it cannot be read)."""
    path = location(where)
    try:
        data = storage.get_bytes(path) if storage.is_uri(path) else Path(path).read_bytes()
        out = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and "step" in out else None


def clear(where: str | os.PathLike) -> None:
    """Remove a stage's progress (a new attempt starts without its predecessor's)."""
    path = location(where)
    try:
        if storage.is_uri(path):
            storage.delete(path)
        else:
            Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def duration(s: float) -> str:
    """`45s`, `12m05s`, `3h07m`."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def describe(p: dict[str, Any] | None, now: float | None = None, stale_s: float = 60.0) -> str:
    """One line: `step 40/100 (40%), loss 0.51, 1.3 step/s, ETA 46s` (the ETA counted down from the last
    update), and `(updated 5m ago)` when the last update is older than `stale_s` seconds."""
    if not p:
        return ""
    unit, step, total = p.get("unit") or "step", p.get("step"), p.get("total")
    if not _number(step):
        return ""
    parts = [f"{unit} {_num(step)}/{_num(total)} ({step / total:.0%})" if _number(total) and total
             else f"{unit} {_num(step)}"]
    parts += [f"{k} {_num(v)}" for k, v in (p.get("metrics") or {}).items() if _number(v)]
    rate = p.get("rate")
    if _number(rate) and rate > 0:
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}")
    eta = p.get("eta_s")
    age = (now if now is not None else time.time()) - float(p.get("time") or 0)
    if _number(eta) and _number(total) and step < total:
        parts.append(f"ETA {duration(max(0.0, eta - age))}")  # counted from the last update
    return ", ".join(parts) + (f" (updated {duration(age)} ago)" if age > stale_s else "")
