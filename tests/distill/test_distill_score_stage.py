"""The `distill.score` stage on world corpora: through the workflow engine with MLflow (cues only) and directly
with a judge from the scorer registry; counts reconcile, the columns are there, penalties lie in [1, 2]."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from r1v.core.config import ConfigError
from r1v.distill.config import DistillScoreConfig
from r1v.distill.quality import COLUMNS, DRLC_COLUMNS, score_quality
from r1v.workflow import tracking
from r1v.workflow.runner import Runner
from r1v.workflow.schema import validate_workflow
from r1v.world.corpora import generate

LOG = tracking.RunLogger(None, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """World corpora; `align2` is the align corpus (2 of its 14 images truncated) split into two files."""
    root = tmp_path_factory.mktemp("world")
    paths = generate(root, n_align=14, n_sft=10, n_grpo=1, n_test=1, seed=4, corrupt_rows=2)
    table = pq.read_table(paths["align"])
    out = root / "align2"
    out.mkdir()
    pq.write_table(table.slice(0, 7), out / "part-00000.parquet", row_group_size=4)
    pq.write_table(table.slice(7), out / "part-00001.parquet", row_group_size=4)
    return {**paths, "align2": out}


def test_stage_through_the_workflow(world: dict[str, Path], tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in world["align2"].iterdir()}
    raw = {"name": "d", "run_root": str(tmp_path / "runs"),
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "d"},
           "stages": {"qdam": {"kind": "distill.score", "config": {
               "corpus": str(world["align2"]), "alpha": 1.0, "batch_rows": 3}}}}
    runner = Runner.create(validate_workflow(raw, "d.yaml"), tmp_path / "run")
    assert runner.run() == {"qdam": "ran"}
    out = runner.state("qdam")["outputs"]
    rows = pq.read_table(out["corpus"]).to_pylist()
    quarantined = pq.read_table(out["quarantine"]).to_pylist()
    assert len(rows) == 12 and [q["reason"] for q in quarantined] == ["image_decode"] * 2
    ids = set(pq.read_table(world["align"]).column("id").to_pylist())
    assert {r["id"] for r in rows} | {q["id"] for q in quarantined} == ids
    assert set(COLUMNS) | set(DRLC_COLUMNS) <= set(rows[0])
    assert all(r["s_v_judge"] is None and r["s_t_judge"] is None and r["s_i_judge"] is None for r in rows)
    assert all(r["s_v"] == r["s_v_cue"] and r["s_v_images"] == 1 and r["s_v_res"] > 0 for r in rows)
    pen = np.array([r["penalty"] for r in rows])
    assert pen.min() >= 1.0 and pen.max() <= 2.0 and pen.max() > pen.min()
    for col in ("s_v", "s_t", "s_i"):  # normalised over the whole corpus (both files), not per file
        vals, norm = np.array([r[col] for r in rows]), np.array([r[f"{col}_norm"] for r in rows])
        if vals.max() > vals.min():
            assert norm.min() == 0.0 and norm.max() == 1.0
            np.testing.assert_allclose(norm, (vals - vals.min()) / (vals.max() - vals.min()))
        else:
            assert np.all(norm == 0.5)
    mix = np.array([(r["s_v_norm"] + r["s_t_norm"] + r["s_i_norm"]) / 3 for r in rows])
    np.testing.assert_allclose(pen, np.minimum(2.0, np.exp(1.0 - mix)))
    s = json.loads(Path(out["summary"]).read_text())
    assert s["rows_in"] == 14 == s["rows_scored"] + s["quarantined"] and s["quarantine_reasons"] == {"image_decode": 2}
    assert sum(s["penalty_histogram"].values()) == 12
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(raw["tracking"]["tracking_uri"]).get_run(runner.state("qdam")["mlflow_run_id"]).data.metrics
    assert metrics["rows_scored"] == 12 and metrics["quarantined_image_decode"] == 2
    assert metrics["penalty_max"] == pytest.approx(pen.max()) and metrics["s_v_mean"] > 0
    assert {p.name: p.read_bytes() for p in world["align2"].iterdir()} == before  # the input is untouched


def test_stage_with_a_judge_and_its_failures(world: dict[str, Path], tmp_path: Path) -> None:
    """The `rule` scorer stands in for a judge of S_t: rows it cannot score are quarantined with its reason."""
    table = pq.read_table(world["sft"])
    rows = table.to_pylist()
    rows[0]["messages"] = rows[0]["messages"][:1]  # no assistant turn: the rule judge cannot score it
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pq.read_table(world["sft"]).from_pylist(rows, schema=table.schema), src / "part-00000.parquet")
    c = DistillScoreConfig(corpus=str(src), text_judge={"scorer": {"kind": "rule"}, "weight": 0.25},
                           max_quarantined_fraction=0.2)
    res = score_quality(c, tmp_path / "st", LOG)
    out = pq.read_table(res["corpus"]).to_pylist()
    q = pq.read_table(res["quarantine"]).to_pylist()
    assert [(x["id"], x["reason"]) for x in q] == [(rows[0]["id"], "no_response")]
    assert q[0]["detail"].startswith("text_judge:") and len(out) == len(rows) - 1
    for r in out:
        assert 0 <= r["s_t_judge"] <= 5 and r["s_v_judge"] is None
        assert r["s_t"] == pytest.approx(0.75 * r["s_t_cue"] + 0.25 * r["s_t_judge"] / 5)
        assert 1.0 <= r["penalty"] <= 2.0
    again = score_quality(c, tmp_path / "st", LOG)  # done: nothing is recomputed, the summary is the same
    assert {k: again[k] for k in ("rows_in", "rows_scored", "bounds")} == \
           {k: res[k] for k in ("rows_in", "rows_scored", "bounds")}
    with pytest.raises(ValueError, match="already has column"):
        score_quality(c.model_copy(update={"corpus": str(res["corpus"])}), tmp_path / "twice", LOG)


def test_config_errors_name_the_field() -> None:
    def load(cfg: dict) -> None:
        validate_workflow({"name": "t", "stages": {"s": {"kind": "distill.score", "config": {"corpus": "c", **cfg}}}})

    for bad, msg in [({"alpha": -1}, r"alpha"), ({"text_judge": {"scorer": {"kind": "nope"}}}, r"scorer.kind"),
                     ({"vision_judge": {"scorer": {"kind": "rule"}, "weight": 2}}, r"weight"),
                     ({"image_cues": {"w_blur": 0, "w_res": 0, "w_aspect": 0}}, r"must be > 0")]:
        with pytest.raises(ConfigError, match=msg):
            load(bad)
    c = DistillScoreConfig(corpus="c", vision_judge={"scorer": {"kind": "openai", "model": "m",
                                                                "base_url": "http://h"}})
    assert c.vision_judge.scorer.images and "clarity" in c.vision_judge.scorer.prompt  # type: ignore[union-attr]
