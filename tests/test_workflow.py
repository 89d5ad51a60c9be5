"""The DAG engine on its own: ordering, skipping done stages, resuming failed ones, MLflow parent/child runs.

Stage kinds here are registered by the test (the engine knows nothing of ML), so no Ray is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from r1v.core.config import ConfigError, Strict
from r1v.workflow import kinds
from r1v.workflow.kinds import StageKind
from r1v.workflow.runner import Runner, StageFailed, read_events
from r1v.workflow.schema import load_workflow

CALLS: list[str] = []


class WriteConfig(Strict):
    text: str = "x"
    source: str | None = None
    fail_times: int = 0


def write_stage(ctx, c: WriteConfig):
    CALLS.append(ctx.name)
    marker = ctx.path("tries")
    tries = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(tries + 1))
    if tries < c.fail_times:
        raise RuntimeError(f"planned failure {tries + 1}")
    upstream = Path(c.source).read_text() if c.source else ""
    out = ctx.path("out.txt")
    out.write_text(upstream + c.text)
    ctx.log.metrics({"chars": len(out.read_text())}, 0)
    return {"out": str(out)}


kinds.add(StageKind("test.write", WriteConfig, write_stage, ()), replace=True)


YAML = """
name: wf
run_root: {root}
stages:
  c: {{kind: test.write, config: {{text: C, source: "@b.out"}}}}
  a: {{kind: test.write, config: {{text: A}}}}
  b: {{kind: test.write, needs: [a], config: {{text: B, source: "@a.out", fail_times: {fail}}}}}
"""


def make(tmp_path: Path, fail: int = 0, overrides: list[str] | None = None) -> Runner:
    p = tmp_path / "wf.yaml"
    p.write_text(YAML.format(root=tmp_path / "runs", fail=fail))
    return Runner.create(load_workflow(p, overrides), tmp_path / "runs" / "r1")


def test_runs_in_dependency_order_and_passes_outputs(tmp_path):
    CALLS.clear()
    r = make(tmp_path)
    assert r.run() == {"a": "ran", "b": "ran", "c": "ran"}
    assert CALLS == ["a", "b", "c"]
    assert Path(r.state("c")["outputs"]["out"]).read_text() == "ABC"
    client = MlflowClient(r.meta["tracking_uri"])
    parent = client.get_run(r.meta["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["stages.a.kind"] == "test.write"
    children = client.search_runs([r.meta["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{r.meta['parent_run_id']}'")
    assert sorted(c.info.run_name for c in children) == ["a", "b", "c"]
    assert all(c.info.status == "FINISHED" and c.data.metrics["chars"] > 0 for c in children)


def test_failed_stage_resumes_without_redoing_finished_ones(tmp_path):
    CALLS.clear()
    r = make(tmp_path, fail=1)
    with pytest.raises(StageFailed, match="planned failure 1"):
        r.run()
    assert [row["status"] for row in r.status_rows()] == ["done", "failed", "pending"]
    client = MlflowClient(r.meta["tracking_uri"])
    assert client.get_run(r.meta["parent_run_id"]).info.status == "FAILED"
    failed_child = r.state("b")["mlflow_run_id"]
    assert client.get_run(failed_child).info.status == "FAILED"

    again = Runner.open(r.run_dir)
    assert again.run() == {"a": "skipped", "b": "ran", "c": "ran"}
    assert CALLS == ["a", "b", "b", "c"]
    assert again.state("b")["attempts"] == 2 and again.state("b")["mlflow_run_id"] == failed_child
    assert client.get_run(failed_child).info.status == "FINISHED"  # the same child run, now finished
    events = [(e["stage"], e["event"]) for e in read_events(r.run_dir)]
    assert ("b", "failed") in events and events[-1] == ("c", "finished")


def test_changed_config_reruns_that_stage_and_downstream_only(tmp_path):
    CALLS.clear()
    r = make(tmp_path)
    r.run()
    again = Runner.open(r.run_dir, ["stages.b.config.text=Z"])
    assert again.run() == {"a": "skipped", "b": "ran", "c": "ran"}
    assert Path(again.state("c")["outputs"]["out"]).read_text() == "AZC"
    assert Runner.open(r.run_dir).run() == {"a": "skipped", "b": "skipped", "c": "skipped"}


def test_missing_output_makes_a_done_stage_run_again(tmp_path):
    r = make(tmp_path)
    r.run()
    Path(r.state("a")["outputs"]["out"]).unlink()
    assert Runner.open(r.run_dir).run()["a"] == "ran"


def test_cycles_and_bad_refs_are_config_errors_at_load(tmp_path):
    p = tmp_path / "wf.yaml"
    p.write_text("name: x\nstages:\n  a: {kind: test.write, config: {source: '@b.out'}}\n"
                 "  b: {kind: test.write, config: {source: '@a.out'}}\n")
    with pytest.raises(ConfigError, match=r"cycle among \['a', 'b'\]"):
        load_workflow(p)
    p.write_text("name: x\nstages:\n  a: {kind: test.write, config: {source: '@ghost.out'}}\n")
    with pytest.raises(ConfigError, match="stages.a: @ghost.out refers to unknown stage 'ghost'"):
        load_workflow(p)
    p.write_text("name: x\nstages:\n  m: {kind: model.tiny}\n  e: {kind: eval, config: {model: '@m.modle', "
                 "corpus: /c}}\n")
    with pytest.raises(ConfigError, match=r"@m.modle: a model.tiny stage has no output 'modle' \(it has model, llm\)"):
        load_workflow(p)


def test_only_with_an_unknown_stage_is_a_config_error_that_names_the_stages(tmp_path):
    CALLS.clear()
    r = make(tmp_path)
    with pytest.raises(ConfigError, match=r"no stage named 'bb'.*its stages: a, b, c"):
        r.run(only=["a", "bb"])
    # argparse gives `--only b stages.b.config.text=Z` the override as a stage name: say where overrides go.
    with pytest.raises(ConfigError, match="overrides .* go before --only"):
        r.run(only=["b", "stages.b.config.text=Z"])
    assert CALLS == [] and r.status_rows()[0]["status"] == "pending"
    assert r.run(only=["a"]) == {"a": "ran"}


def test_the_cli_checks_only_before_making_a_run_directory(tmp_path, capsys):
    from r1v.cli import main

    p = tmp_path / "wf.yaml"
    p.write_text(YAML.format(root=tmp_path / "runs", fail=0))
    assert main(["run", str(p), "--run-dir", str(tmp_path / "r"), "--only", "a", "stages.a.config.text=Q"]) == 2
    assert "go before --only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_new_run_refuses_an_existing_run_directory_and_names_resume(tmp_path):
    r = make(tmp_path)
    p = tmp_path / "wf.yaml"
    with pytest.raises(ConfigError, match=f"r1v resume {r.run_dir}"):
        Runner.create(load_workflow(p), r.run_dir)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        Runner.create(load_workflow(p), tmp_path / "other")
    (tmp_path / "empty").mkdir()
    assert Runner.create(load_workflow(p), tmp_path / "empty").run() == {"a": "ran", "b": "ran", "c": "ran"}
