"""The console of `r1v run`: one line per stage on screen, everything a stage prints in RUN/logs/<stage>.log.

Runs fake stage kinds through the real Runner and CLI (Ray replaced by a no-op), so it is fast.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest

from r1v.cli import app as cli
from r1v.core.config import Strict
from r1v.workflow import kinds
from r1v.workflow.console import Console, error_lines, summary
from r1v.workflow.kinds import StageKind
from r1v.workflow.runner import Runner, StageFailed
from r1v.workflow.schema import load_workflow


class EchoConfig(Strict):
    text: str = "x"
    fail: bool = False


def echo_stage(ctx, c: EchoConfig):
    print(f"python print from {ctx.name}")
    print(f"stderr line from {ctx.name}", file=sys.stderr)
    os.write(1, f"fd-level write from {ctx.name}\n".encode())  # what C code and Ray's log monitor do
    if c.fail:
        raise ValueError(f"context line\nbroken {ctx.name}")
    summary(f"{len(c.text)} chars,   {c.text}")
    out = ctx.path("out.txt")
    out.write_text(c.text)
    return {"out": str(out)}


kinds.add(StageKind("test.echo", EchoConfig, echo_stage, ()), replace=True)


YAML = """
name: con
run_root: {root}
tracking: {{tracking_uri: "{uri}"}}
stages:
  a: {{kind: test.echo, config: {{text: hello}}}}
  b: {{kind: test.echo, needs: [a], config: {{fail: {fail}}}}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow database for the module: creating one costs seconds (schema migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _workflow(tmp_path: Path, store: str, fail: bool = False) -> Path:
    p = tmp_path / "wf.yaml"
    p.write_text(YAML.format(root=tmp_path / "runs", uri=store, fail=str(fail).lower()))
    return p


def _run(tmp_path: Path, store: str, fail: bool = False,
         verbose: bool = False) -> tuple[Runner, str, BaseException | None]:
    """Create and run the workflow under a Console; returns the runner, the console text, the failure."""
    out = io.StringIO()
    err = None
    with Console(verbose, stream=out) as con:
        print("before the run directory exists")
        runner = Runner.create(load_workflow(_workflow(tmp_path, store, fail)), tmp_path / "runs" / "r1")
        con.attach(runner.run_dir)
        runner.console = con
        try:
            runner.run()
        except StageFailed as e:
            err = e
    return runner, out.getvalue(), err


def test_one_line_per_stage_and_prints_in_the_stage_log(tmp_path, store):
    runner, shown, err = _run(tmp_path, store)
    assert err is None
    lines = shown.splitlines()
    assert lines[0] == "[1/2] a (test.echo) ..."
    assert lines[1].startswith("[1/2] a (test.echo) ... done in ") and lines[1].endswith("s")
    assert lines[2] == "      5 chars, hello"  # the stage's summary, whitespace collapsed
    assert lines[3] == "[2/2] b (test.echo) ..." and lines[4].startswith("[2/2] b (test.echo) ... done in ")
    assert lines[5] == "      1 chars, x" and len(lines) == 6
    assert "print from" not in shown and "before the run" not in shown

    logs = runner.run_dir / "logs"
    a_log = (logs / "a.log").read_text()
    for text in ("python print from a", "stderr line from a", "fd-level write from a", "summary: 5 chars, hello"):
        assert text in a_log
    assert "from b" not in a_log and "fd-level write from b" in (logs / "b.log").read_text()
    assert "before the run directory exists" in (logs / "driver.log").read_text()

    again = Runner.open(runner.run_dir)
    out = io.StringIO()
    with Console(stream=out) as con:
        con.attach(again.run_dir)
        again.console = con
        again.run()
    assert out.getvalue().splitlines() == ["[1/2] a (test.echo) ... skipped (done)",
                                           "[2/2] b (test.echo) ... skipped (done)"]


def test_failed_stage_shows_its_error_and_log(tmp_path, store):
    runner, shown, err = _run(tmp_path, store, fail=True)
    assert isinstance(err, StageFailed)
    lines = shown.splitlines()
    log = runner.run_dir / "logs" / "b.log"
    assert lines[-2].startswith("[2/2] b (test.echo) ... FAILED after ")
    assert lines[-2].endswith(f"s: broken b  (log: {log})")  # tmp_path is not under the cwd: absolute
    assert lines[-1] == "    | ValueError: context line"
    text = log.read_text()
    assert "Traceback" in text and "ValueError: context line" in text and "stage b failed" in text


def test_verbose_prints_everything_and_writes_no_logs(tmp_path, store, capfd):
    runner, shown, err = _run(tmp_path, store, verbose=True)
    assert err is None
    assert "[2/2] b (test.echo) ... done in" in shown
    printed = capfd.readouterr()
    assert "python print from a" in printed.out and "fd-level write from b" in printed.out
    assert not (runner.run_dir / "logs").exists()


def test_tty_updates_one_line_in_place(tmp_path, store):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with Console(stream=out) as con:
        runner = Runner.create(load_workflow(_workflow(tmp_path, store)), tmp_path / "runs" / "r1")
        con.attach(runner.run_dir)
        runner.console = con
        runner.run()
    shown = out.getvalue()
    # the line is rewritten in place: once a second while the stage runs (a loaded machine shows ticks), then done
    line = re.escape("[1/2] a (test.echo) ...")
    assert re.match(rf"{line}(\r\x1b\[2K{line} \d+s)*\r\x1b\[2K{line} done in ", shown), shown[:300]
    assert shown.count("\n") == 4  # two done lines, two summary lines


def test_cli_run_prints_progress_then_the_table(tmp_path, store, monkeypatch, capsys):
    monkeypatch.setattr(cli, "init_ray", lambda *a, **k: False)  # the fake stages need no Ray
    run_dir = tmp_path / "runs" / "r1"
    assert cli.main(["run", str(_workflow(tmp_path, store, fail=True)), "--run-dir", str(run_dir)]) == 1
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0] == f"r1v: run directory {run_dir}"
    assert lines[1:3] == ["[1/2] a (test.echo) ...", lines[2]] and "done in" in lines[2]
    assert any(line.startswith("[2/2] b (test.echo) ... FAILED") for line in lines)
    assert any(line.startswith("b                test.echo        failed") for line in lines)
    assert f"full logs in {run_dir}/logs/" in cap.out and "print from" not in cap.out + cap.err
    assert f"r1v resume {run_dir}" in cap.err

    assert cli.main(["resume", str(run_dir), "stages.b.config.fail=false"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] a (test.echo) ... skipped (done)" in out and "r1v: done; ran ['b'], skipped ['a']" in out


def test_error_lines_use_the_stage_cause():
    try:
        try:
            raise RuntimeError("training failed:\n  worker traceback\nKeyError: 'x'")
        except RuntimeError as e:
            raise StageFailed("s", Path("/r"), e) from e
    except StageFailed as wrapped:
        assert error_lines(wrapped)[-1] == "KeyError: 'x'"


def test_summary_outside_a_stage_just_prints(capsys):
    summary("loose")
    assert capsys.readouterr().out == "loose\n"
