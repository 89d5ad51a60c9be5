"""The tiny R1V workflow end to end on the shared local Ray cluster, through the `r1v` CLI.

Checks what a user relies on: every stage finished with an MLflow child run holding metrics, the broken
rows were quarantined and counted, and only the projector moved (vision and LLM weights bit-identical).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import torch
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from r1v.cli import main
from r1v.workflow import Runner

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "workflows" / "tiny.yaml"


def params_by_group(model_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    from r1v.model.freeze import param_group_of
    from r1v.model.io import load_model

    model, _ = load_model(model_dir)
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "llm": {}}
    for name, p in model.named_parameters():
        out[param_group_of(name)][name] = p.detach().clone()
    return out


def assert_projector_only(before: str, after: str) -> None:
    a, b = params_by_group(before), params_by_group(after)
    for group in ("vision", "llm"):
        assert a[group].keys() == b[group].keys()
        changed = [n for n in a[group] if not torch.equal(a[group][n], b[group][n])]
        assert not changed, f"{group} weights changed: {changed[:3]}"
    assert any(not torch.equal(a["projector"][n], b["projector"][n]) for n in a["projector"]), \
        "the projector did not change"


@pytest.mark.slow
def test_tiny_workflow_end_to_end(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["run", str(TINY), f"run_root={tmp_path}", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    runner = Runner.open(run_dir)
    outputs = {s: runner.state(s)["outputs"] for s in runner.wf.config.stages}

    client = MlflowClient(runner.meta["tracking_uri"])
    parent = client.get_run(runner.meta["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = {c.info.run_name: c for c in client.search_runs(
        [runner.meta["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == set(runner.wf.config.stages)
    assert all(c.info.status == "FINISHED" and c.data.metrics for c in children.values())
    assert {"loss", "lr", "tokens_per_s", "rows_quarantined"} <= set(children["sft"].data.metrics)
    assert {"reward", "accuracy", "response_length", "kl", "clip_frac"} <= set(children["grpo"].data.metrics)
    assert "pass_at_1" in children["eval"].data.metrics
    assert children["sft"].data.params["optim.lr"] == "0.001"  # the resolved stage config is logged

    counts = json.loads((run_dir / "stages" / "sft" / "epoch-0-counts.json").read_text())
    assert counts == {"epoch": 0, "rows_in": 48, "rows_trained": 46, "rows_quarantined": 2,
                      "quarantined_by_reason": {"image_decode": 2}}
    import pyarrow.parquet as pq

    q = pq.read_table(run_dir / "stages" / "sft" / "quarantine" / "epoch-0.parquet").to_pylist()
    assert len(q) == 2 and all(r["reason"] == "image_decode" and r["detail"] for r in q)

    assert_projector_only(outputs["models"]["model"], outputs["align"]["model"])
    assert_projector_only(outputs["reassemble"]["model"], outputs["sft"]["model"])
    assert_projector_only(outputs["sft"]["model"], outputs["grpo"]["model"])
    # re-assembly kept the aligned projector and took the reasoning LLM
    aligned, reassembled = params_by_group(outputs["align"]["model"]), params_by_group(
        outputs["reassemble"]["model"])
    assert all(torch.equal(aligned["projector"][n], reassembled["projector"][n]) for n in aligned["projector"])
    from r1v.model.io import load_llm

    llm, _ = load_llm(outputs["models"]["llm"])
    llm_params = dict(llm.named_parameters())
    emb = next(n for n in reassembled["llm"] if n.endswith("embed_tokens.weight"))
    assert torch.equal(reassembled["llm"][emb], llm_params["model.embed_tokens.weight"])

    summary = json.loads(Path(outputs["eval"]["summary"]).read_text())
    assert summary["items"] == 16 and summary["samples"] == 2
    assert main(["status", str(run_dir)]) == 0
    assert "eval             eval             done" in capsys.readouterr().out

    # the run-inspection notebook executes against this run and draws its curves
    nb = nbformat.read(ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    os.environ["R1V_RUN"] = str(run_dir)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("R1V_RUN", None)
    assert (run_dir / "curves.png").stat().st_size > 0
