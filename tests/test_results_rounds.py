"""The results table's corpus columns: each trained stage's row carries the size of the corpus it trained on, and
a round's row (trained on a `select` stage's corpus) its split into rows kept by score and added as errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from r1v.core.fs import atomic_write_json
from r1v.eval import results
from r1v.workflow import tracking
from r1v.workflow.fingerprint import SCHEME
from r1v.workflow.runner import Runner
from r1v.workflow.schema import validate_workflow


def _summary(acc: float) -> dict:
    return {"accuracy": acc, "stderr": 0.01, "n": 100, "pass_at_1": acc, "pass_at_1_stderr": 0.01,
            "mean_response_tokens": 20.0, "accuracy_by_level": {}}


def _corpus(path: Path, sizes: list[int]) -> Path:
    path.mkdir(parents=True)
    for k, n in enumerate(sizes):
        pq.write_table(pa.table({"id": [f"r{k}-{i}" for i in range(n)]}), path / f"part-{k:05d}.parquet")
    return path


def test_round_rows_carry_their_corpus_size_and_split(tmp_path: Path) -> None:
    d = _corpus(tmp_path / "d", [40, 2])
    stages = {
        "models": {"kind": "model.tiny", "config": {}},
        "sft": {"kind": "sft", "config": {"model": "@models.model", "corpus": str(d)}},
        "round1_select": {"kind": "select", "config": {"corpus": str(d), "tau": 3}},
        "round1_sft": {"kind": "sft", "config": {"model": "@sft.model", "corpus": "@round1_select.corpus"}},
        "eval_sft": {"kind": "eval", "config": {"model": "@sft.model", "corpus": "c", "report_stage": "sft"}},
        "round1_eval": {"kind": "eval", "config": {"model": "@round1_sft.model", "corpus": "c",
                                                   "report_stage": "round1_sft"}},
        "eval_models": {"kind": "eval", "config": {"model": "@models.model", "corpus": "c",
                                                   "report_baseline": "substitute_vlm"}},
    }
    raw = {"name": "fake", "run_root": str(tmp_path / "runs"),
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "rounds"},
           "stages": stages}
    runner = Runner.create(validate_workflow(raw), tmp_path / "runs" / "fake")
    fps = runner.fingerprints()
    sel = runner.stage_dir("round1_select")
    atomic_write_json(sel / "counts.json", {"rows_out": 31, "totals": {"kept_by_score": 25, "added_as_errors": 6}})
    atomic_write_json(sel / "state.json", {"status": "done", "scheme": SCHEME, "fingerprint": fps["round1_select"],
                                           "outputs": {
        "corpus": str(_corpus(sel / "corpus", [31])), "counts": str(sel / "counts.json")}})
    for name, acc in (("eval_sft", 0.2), ("round1_eval", 0.25), ("eval_models", 0.1)):
        atomic_write_json(runner.stage_dir(name) / "summary.json", _summary(acc))
        atomic_write_json(runner.stage_dir(name) / "state.json", {
            "status": "done", "scheme": SCHEME, "fingerprint": fps[name],
            "outputs": {"summary": str(runner.stage_dir(name) / "summary.json")}})
    meta = json.loads((runner.run_dir / "run.json").read_text())
    tracking.set_status(meta["tracking_uri"], meta["parent_run_id"], "FINISHED")

    res = results.report(runner.run_dir)
    assert res is not None
    sft, round1 = res["stages"]
    assert (sft["stage"], sft["corpus_rows"], "corpus_by_score" in sft) == ("sft", 42, False)
    assert (round1["stage"], round1["accuracy"], round1["corpus_rows"], round1["corpus_by_score"],
            round1["corpus_as_errors"]) == ("round1_sft", 0.25, 31, 25, 6)
    assert "corpus_rows" not in res["baselines"]["substitute_vlm"]
    table = results.format_table(res).splitlines()
    assert table[0].split()[-2:] == ["corpus", "rows"]
    assert table[2].split()[-1] == "42" and table[3].endswith("31 (25 + 6 err)") and table[4].endswith("-")
    metrics = MlflowClient(meta["tracking_uri"]).get_run(meta["parent_run_id"]).data.metrics
    assert (metrics["results/round1_sft/corpus_rows"], metrics["results/round1_sft/corpus_as_errors"]) == (31, 6)
    assert metrics["results/sft/corpus_rows"] == 42
