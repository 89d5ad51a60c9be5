"""Stage kinds for the workflow engine's tests that run in a child process (`r1v run` killed by pid): imported
by the child before the CLI, they join the catalogue the way `r1v.workflow.kinds.add` lets a plugin's kinds."""

from __future__ import annotations

import os
import time
from pathlib import Path

from r1v.core.config import Strict
from r1v.workflow import kinds
from r1v.workflow.kinds import StageKind


class SleepConfig(Strict):
    seconds: float = 60.0
    text: str = "x"


def sleep_stage(ctx, c: SleepConfig) -> dict[str, str]:
    """Writes its pid (so a test knows the stage started), sleeps, then writes its output."""
    ctx.path("pid").write_text(str(os.getpid()))
    time.sleep(c.seconds)
    out = ctx.path("out.txt")
    out.write_text(c.text)
    return {"out": str(out)}


kinds.add(StageKind("test.sleep", SleepConfig, sleep_stage, ("out",), ray=False), replace=True)


def wait_for(path: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


class MetricsConfig(Strict):
    steps: int = 20
    pause_at: list[int] = []
    gate_dir: str = ""


def metrics_stage(ctx, c: MetricsConfig) -> dict[str, str]:
    """Logs a metric per step and a text artifact; at each step in `pause_at` it writes `at-STEP` in `gate_dir`
    and waits for the test to write `go-STEP` (so a test can stop a tracking server mid-stage)."""
    for step in range(c.steps):
        if step in c.pause_at:
            (Path(c.gate_dir) / f"at-{step}").write_text("")
            wait_for(Path(c.gate_dir) / f"go-{step}", 120)
        ctx.log.metrics({"loss": 1.0 / (step + 1)}, step)
        time.sleep(0.02)
    ctx.log.text("hello from the stage\n", "notes/hello.txt")
    out = ctx.path("done.txt")
    out.write_text(str(c.steps))
    return {"out": str(out)}


kinds.add(StageKind("test.metrics", MetricsConfig, metrics_stage, ("out",), ray=False), replace=True)


class ProgressConfig(Strict):
    steps: int = 10
    pause_at: int = 0
    gate_dir: str = ""
    step_s: float = 0.0


def _png(size: int, color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def progress_stage(ctx, c: ProgressConfig) -> dict[str, str]:
    """Reports `steps` steps (loss 1/step) through `ctx.progress`; at `pause_at` it writes `at-STEP` in `gate_dir`
    and waits for `go-STEP` (so a test can read `r1v status` while it runs). Then logs a sample table in which
    every other row has an image, as the training and generation stages do."""
    for step in range(1, c.steps + 1):
        ctx.progress(step, c.steps, loss=1.0 / step)
        ctx.log.metrics({"loss": 1.0 / step}, step)
        if step == c.pause_at:
            (Path(c.gate_dir) / f"at-{step}").write_text("")
            wait_for(Path(c.gate_dir) / f"go-{step}", 120)
        time.sleep(c.step_s)
    rows = [{"step": c.steps, "id": f"row{i}", "completion": f"<think>...</think> answer {i}", "reward": float(i % 2),
             "images": [_png(64, (40 * i, 90, 160))] if i % 2 == 0 else []} for i in range(4)]
    ctx.log.table_rows([{k: v for k, v in r.items() if k != "images"} for r in rows],
                       f"samples/step-{c.steps:05d}.jsonl")
    ctx.log.table(rows, f"samples/step-{c.steps:05d}.json", images="images")
    out = ctx.path("done.txt")
    out.write_text(str(c.steps))
    return {"out": str(out)}


if os.environ.get("R1V_TEST_PROGRESS_LINE_S"):  # the console's progress lines without a terminal, sooner
    from r1v.workflow.console import Console

    Console.PROGRESS_LINE_S = float(os.environ["R1V_TEST_PROGRESS_LINE_S"])
    Console.WATCH_S = 0.2

kinds.add(StageKind("test.progress", ProgressConfig, progress_stage, ("out",), ray=False), replace=True)
