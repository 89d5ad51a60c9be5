"""`r1v plan`: the per-stage table of `r1v.plan.planner.Planner` and the command that prints it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from r1v.core.config import ConfigError
from r1v.plan.planner import GB, Plan, PlanError, Planner, parse_memory
from r1v.workflow.schema import load_workflow

# --------------------------------------------------------------------------- the table and the command


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.{2 if x < GB else 1}f}"


def format_plan(p: Plan) -> str:
    head = (
        "stage",
        "kind",
        "role",
        "GPUs",
        "params",
        "train",
        "weights",
        "grads",
        "optim",
        "activ",
        "total",
        "fits",
        "PFLOP",
        "output",
    )
    stage_gpus, lines = p.stage_gpus(), []
    for r in p.rows:
        on_gpu = bool(r.gpus)
        fits = (
            "-"
            if r.params is None
            else "cpu"
            if not on_gpu
            else ("no" if r.short_gb > 0 or stage_gpus[r.stage] > p.gpus else "yes")
        )
        mem = [_gb(x) if on_gpu else "-" for x in (*(r.mem or (None,) * 4), r.total)]
        lines.append(
            (
                r.stage,
                r.kind,
                r.role,
                str(r.gpus or "-"),
                _count(r.params),
                _count(r.trainable),
                *mem,
                fits,
                "-" if r.flops is None else f"{r.flops / 1e15:.3g}",
                _gb(r.output),
            )
        )
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = [
        f"r1v plan: {p.gpus} GPUs x {p.gpu_bytes / GB:.1f} GB. Memory per GPU in GB (1e9 bytes), total with "
        f"{p.reserve / GB:.1f} GB reserve; PFLOP per optimizer step (eval: the whole run); output in GB"
    ]
    for row in [head, *lines]:
        cells = [x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(cells))
    if p.assumed:
        out.append("assumed, not implemented in r1v yet:")
        out.extend(f"  {what}: {', '.join(stages)}" for what, stages in p.assumed.items())
    if p.notes:
        out.append("notes:")
        out.extend(
            f"  {n}" + ("" if n.startswith(f"{stages[0]}.") else f" ({', '.join(stages)})")
            for n, stages in p.notes.items()
        )
    return "\n".join(out)


def plan_workflow(path: str, overrides: list[str], gpus: int, gpu_bytes: float) -> Plan:
    return Planner(load_workflow(path, overrides), gpus, gpu_bytes).run()


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        p = plan_workflow(args.workflow, args.overrides, args.gpus, args.gpu_memory)
    except PlanError as e:
        raise ConfigError(f"{args.workflow}: {e}") from None
    print(format_plan(p))
    refused = p.refusals()
    for line in refused:
        print(f"r1v plan: refused: {line}", file=sys.stderr)
    if not refused:
        print(f"r1v plan: every stage fits on {p.gpus} GPUs x {p.gpu_bytes / GB:.1f} GB")
    return 1 if refused else 0


class _Intermixed(argparse.ArgumentParser):
    """Options and positionals in any order: `r1v plan WF --gpus 64 --gpu-memory 80GB a.b=c` keeps `a.b=c`."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_plan_parser(sub: Any) -> None:
    pl = sub.add_parser("plan", help="size each stage (parameters, per-GPU memory, FLOPs, outputs) for a cluster")
    pl.__class__ = _Intermixed
    pl.add_argument("workflow")
    pl.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs available to the run")
    pl.add_argument("--gpu-memory", type=parse_memory, required=True, help="memory per GPU, e.g. 80GB or 141GiB")
    pl.set_defaults(fn=cmd_plan)
