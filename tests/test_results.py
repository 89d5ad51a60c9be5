"""The results table: collected from a (fake) run directory's eval summaries, written, printed, plotted, logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from r1v.core.fs import atomic_write_json
from r1v.eval import results
from r1v.workflow import tracking
from r1v.workflow.fingerprint import SCHEME
from r1v.workflow.runner import Runner
from r1v.workflow.schema import validate_workflow


def _evals(**evals: dict) -> dict:
    stages = {
        "models": {"kind": "model.tiny", "config": {}},
        "reassemble": {"kind": "reassemble", "config": {"model": "@models.model", "llm": "@models.llm"}},
        "sft": {"kind": "sft", "config": {"model": "@reassemble.model", "corpus": "c"}},
    }
    stages.update({n: {"kind": "eval", "config": {"corpus": "c", **e}} for n, e in evals.items()})
    return stages


def _summary(acc: float, n: int = 100, p1: float = 0.3) -> dict:
    return {"accuracy": acc, "stderr": (acc * (1 - acc) / n) ** 0.5, "n": n, "items": n, "pass_at_1": p1,
            "pass_at_1_stderr": 0.02, "pass_at_1_std": 0.01, "mean_response_tokens": 12.5,
            "accuracy_by_level": {"1": {"n": n, "accuracy": acc, "pass_at_1": p1}}}


def _run(tmp_path: Path, stages: dict, summaries: dict[str, dict]) -> Path:
    raw = {"name": "fake", "run_root": str(tmp_path / "runs"),
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "results"},
           "stages": stages}
    runner = Runner.create(validate_workflow(raw), tmp_path / "runs" / "fake")
    fps = runner.fingerprints()
    for name, s in summaries.items():
        path = runner.stage_dir(name) / "summary.json"
        atomic_write_json(path, s)
        atomic_write_json(runner.stage_dir(name) / "state.json", {"status": "done", "scheme": SCHEME,
                                                                  "fingerprint": fps[name],
                                                                  "outputs": {"summary": str(path)}})
    return runner.run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    # Declared out of order: the table follows the workflow order of the evaluated stages.
    stages = _evals(eval_sft={"model": "@sft.model", "report_stage": "sft"},
                    eval_re={"model": "@reassemble.model", "report_stage": "reassemble"},
                    eval_blank={"model": "@sft.model", "mode": "no_image", "report_baseline": "no_image"},
                    eval_sub={"model": "@models.model", "report_baseline": "substitute_vlm"},
                    eval_text={"model": "@models.llm", "mode": "text", "report_baseline": "text_reasoning"},
                    eval_extra={"model": "@sft.model"})
    return _run(tmp_path, stages, {"eval_sft": _summary(0.6), "eval_re": _summary(0.2), "eval_extra": _summary(0.9),
                                   "eval_blank": _summary(0.1), "eval_sub": _summary(0.15),
                                   "eval_text": _summary(0.8, n=99)})


def test_collect_shape_and_order(run_dir: Path) -> None:
    res = results.collect(run_dir)
    assert [r["stage"] for r in res["stages"]] == ["reassemble", "sft"]
    assert set(res["baselines"]) == {"no_image", "substitute_vlm", "text_reasoning"}
    for row in [*res["stages"], *res["baselines"].values()]:
        assert {"accuracy", "stderr", "n", "pass_at_1", "mean_response_tokens"} <= set(row)
    sft = res["stages"][1]
    assert (sft["accuracy"], sft["n"], sft["pass_at_1"], sft["eval_stage"]) == (0.6, 100, 0.3, "eval_sft")
    assert res["baselines"]["text_reasoning"]["n"] == 99
    assert "missing" not in res


def test_report_writes_json_table_png_and_logs_to_the_parent_run(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    tracking.set_status(meta["tracking_uri"], meta["parent_run_id"], "FINISHED")  # as after `r1v run`
    res = results.report(run_dir)
    assert res is not None
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(res))
    png = (run_dir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000

    table = results.format_table(res).splitlines()
    assert table[0].split()[:3] == ["row", "accuracy", "pass@1"]
    body = table[2:]
    assert [line.split()[0] for line in body[:2]] == ["reassemble", "sft"]
    assert body[1].split()[1:4] == ["0.600", "±", f"{(0.6 * 0.4 / 100) ** 0.5:.3f}"]
    assert any(line.startswith("baseline: no_image") for line in body)

    client = MlflowClient(meta["tracking_uri"])
    metrics = client.get_run(meta["parent_run_id"]).data.metrics
    assert metrics["results/sft/accuracy"] == pytest.approx(0.6)
    assert metrics["results/reassemble/n"] == 100
    assert metrics["results/baseline/no_image/accuracy"] == pytest.approx(0.1)
    assert metrics["results/baseline/text_reasoning/pass_at_1"] == pytest.approx(0.3)
    arts = {a.path for a in client.list_artifacts(meta["parent_run_id"], "results")}
    assert {"results/results.json", "results/results.png"} <= arts


def test_missing_summary_is_listed_not_fatal(tmp_path: Path) -> None:
    stages = _evals(eval_sft={"model": "@sft.model", "report_stage": "sft"},
                    eval_blank={"model": "@sft.model", "mode": "no_image", "report_baseline": "no_image"})
    run_dir = _run(tmp_path, stages, {"eval_sft": _summary(0.5)})
    res = results.report(run_dir)
    assert res["missing"] == ["eval_blank"] and res["baselines"] == {}
    assert "eval_blank" in results.format_table(res)
    assert (run_dir / "results.png").exists()


def test_stale_summary_is_not_reported(run_dir: Path) -> None:
    state = json.loads((run_dir / "stages" / "eval_sft" / "state.json").read_text())
    atomic_write_json(run_dir / "stages" / "eval_sft" / "state.json", {**state, "fingerprint": "other-config"})
    res = results.collect(run_dir)
    assert [r["stage"] for r in res["stages"]] == ["reassemble"] and res["missing"] == ["eval_sft"]


def test_no_report_roles_writes_nothing(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, _evals(eval_sft={"model": "@sft.model"}), {"eval_sft": _summary(0.5)})
    assert results.report(run_dir) is None
    assert not (run_dir / "results.json").exists() and not (run_dir / "results.png").exists()


def test_plot_and_table_tolerate_rows_without_greedy_accuracy(tmp_path: Path) -> None:
    res = {"stages": [{"stage": "grpo", "accuracy": None, "stderr": None, "n": 8, "pass_at_1": 0.25,
                       "pass_at_1_stderr": 0.1, "mean_response_tokens": None}], "baselines": {}}
    assert "-" in results.format_table(res).splitlines()[2]
    assert results.plot(res, tmp_path / "p.png").stat().st_size > 0
