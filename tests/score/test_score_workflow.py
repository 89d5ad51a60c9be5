"""One round of iterative SFT's data side as a workflow: score (rule) -> generate (tiny VLM) -> select, run by the
workflow engine with MLflow; the generate bookkeeping and the select counts (logged to MLflow) reconcile."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from score_corpora import read, write

from r1v.grading.rewards import accuracy, extract_answer
from r1v.rounds.generate import run_generate
from r1v.workflow import tracking
from r1v.workflow.runner import Runner
from r1v.workflow.schema import validate_workflow


def _corpus(tiny_assets, path: Path) -> tuple[str, int]:
    """12 synthetic rows, varied: a wrong reference chain, one without an answer, one without the format."""
    rows = pq.read_table(tiny_assets["train"]).to_pylist()[:12]
    rows[1]["messages"][1]["content"] = rows[1]["messages"][1]["content"].replace("\\boxed{", "\\boxed{9")
    rows[1]["source"] = "synthetic/bad"
    rows[2]["answer"] = ""
    rows[3]["messages"][1]["content"] = "\\boxed{" + rows[3]["answer"] + "}"
    corrupt = sum(json.loads(r["meta"]).get("corrupted", False) for r in rows)
    return str(write(path, rows)), corrupt


def test_score_generate_select_round(tiny_assets, tmp_path: Path) -> None:
    corpus, corrupt = _corpus(tiny_assets, tmp_path / "d")
    raw = {"name": "round", "run_root": str(tmp_path / "runs"),
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "round"},
           "stages": {
               "score": {"kind": "score", "config": {"corpus": corpus, "scorer": {"kind": "rule"}}},
               "gen": {"kind": "generate", "config": {
                   "model": tiny_assets["model"], "corpus": "@score.corpus", "samples": 2, "chunk_rows": 5,
                   "sampling": {"max_new_tokens": 4}, "engine": {"max_batch": 8, "num_cpus": 0.5}}},
               "select": {"kind": "select", "config": {"corpus": "@score.corpus", "errors": "@gen.corpus",
                                                       "tau": 5}}}}
    runner = Runner.create(validate_workflow(raw, "round.yaml"), tmp_path / "run")
    assert runner.run() == {"score": "ran", "gen": "ran", "select": "ran"}
    out = {n: runner.state(n)["outputs"] for n in ("score", "gen", "select")}

    scores = {r["id"]: r["rm_score"] for r in read(out["score"]["corpus"])}
    assert len(scores) == 12 and sorted(scores.values())[:3] == [2.0, 2.0, 3.0] and set(scores.values()) == {2, 3, 5}

    # generate: rows in = rows out + quarantined; per row, the primary answer and the counts match the samples.
    gen, samples = read(out["gen"]["corpus"]), read(out["gen"]["samples"])
    reasons = [r["reason"] for r in read(out["gen"]["quarantine"])]
    assert sorted(reasons) == sorted(["no_answer"] + ["image_decode"] * corrupt)
    assert len(gen) + len(reasons) == 12 and len(samples) == 3 * len(gen)
    for g in gen:
        mine = [s for s in samples if s["id"] == g["id"]]
        assert [s["sample"] for s in mine] == [-1, 0, 1] and g["gen_n"] == 3
        assert all(s["extracted"] == extract_answer(s["response"]) for s in mine)
        assert all(s["correct"] == (accuracy(s["response"], g) == 1.0) for s in mine)
        assert g["gen_correct"] == mine[0]["correct"] and g["gen_answer"] == mine[0]["extracted"]
        assert g["gen_n_correct"] == sum(s["correct"] for s in mine)

    # The stage's engines (Ray actors when a cluster is up, as in the full suite) answer as one in this process.
    c = runner.wf.stage_configs["gen"].model_copy(update={"corpus": out["score"]["corpus"]})
    local = run_generate(c, tmp_path / "local", tracking.RunLogger(None, None), actors=False)
    assert read(local["corpus"]) == gen and read(local["samples"]) == samples

    # select: tau 5 keeps the good chains; the rows below it come back when the model got them wrong.
    sel = read(out["select"]["corpus"])
    wrong = {g["id"] for g in gen if not g["gen_correct"]}
    want = [i for i, s in scores.items() if s >= 5 or i in wrong]
    assert [r["id"] for r in sel] == want
    counts = json.loads(Path(out["select"]["counts"]).read_text())
    tot = counts["totals"]
    assert tot["kept_by_score"] + tot.get("added_as_errors", 0) == len(sel) == counts["rows_out"]
    assert tot["kept_by_score"] + tot.get("added_as_errors", 0) + tot.get("dropped_below_tau", 0) == 12

    from mlflow.tracking import MlflowClient

    client = MlflowClient(raw["tracking"]["tracking_uri"])
    metrics = client.get_run(runner.state("select")["mlflow_run_id"]).data.metrics
    assert metrics["kept_by_score"] == tot["kept_by_score"] and metrics["rows_out"] == len(sel)
    assert metrics["kept_by_score/synthetic"] == counts["by_source"]["synthetic"]["kept_by_score"]
    assert "dropped_below_tau/synthetic/bad" in metrics or "added_as_errors/synthetic/bad" in metrics
    gen_metrics = client.get_run(runner.state("gen")["mlflow_run_id"]).data.metrics
    assert gen_metrics["rows_out"] == len(gen) and gen_metrics["quarantined_no_answer"] == 1
    # progress by rows (docs/watching.md), its accuracy on the parent as the stage's curve, samples as a table
    from r1v.workflow import progress

    done = progress.read(runner.stage_dir("gen"))
    assert (done["step"], done["total"], done["unit"]) == (12, 12, "row") and "accuracy" in done["metrics"]
    assert gen_metrics["progress/fraction"] == 1.0 and "progress/accuracy" in gen_metrics
    assert client.get_metric_history(runner.meta["parent_run_id"], "gen/accuracy")
    gen_run = runner.state("gen")["mlflow_run_id"]
    table = json.loads(Path(client.download_artifacts(gen_run, "sample_generations.json", str(tmp_path))).read_text())
    assert table["data"] and {"image", "question", "response"} <= set(table["columns"])

    assert Runner.open(tmp_path / "run").run() == {"score": "skipped", "gen": "skipped", "select": "skipped"}
