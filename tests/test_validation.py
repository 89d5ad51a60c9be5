"""Validate, then write: a workflow's mistakes fail at load, before a run directory, an MLflow run or Ray exists,
and a resume's bad override leaves the run as it was. YAML means what it says: no duplicate keys, and anchors load
as independent copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1v.cli import main
from r1v.core.config import ConfigError
from r1v.workflow.runner import Runner
from r1v.workflow.schema import load_workflow

ROOT = Path(__file__).resolve().parents[1]


def _run_fails_fast(tmp_path: Path, text: str, capsys, monkeypatch) -> str:
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a workflow that does not validate")

    monkeypatch.setattr("r1v.cli.app.init_ray", no_ray)
    wf = tmp_path / "wf.yaml"
    wf.write_text(text.format(root=tmp_path / "runs"))
    assert main(["run", str(wf)]) == 2
    assert not (tmp_path / "runs").exists()  # no run directory, no MLflow store
    return capsys.readouterr().err


def test_a_duplicate_stage_key_fails_before_anything_is_made(tmp_path, capsys, monkeypatch):
    err = _run_fails_fast(tmp_path, "name: x\nrun_root: {root}\nstages:\n"
                          "  a: {{kind: data.synthetic}}\n  a: {{kind: data.synthetic, config: {{seed: 1}}}}\n", capsys,
                          monkeypatch)
    assert "duplicate key 'a' (first at line 4)" in err


def test_a_cycle_fails_before_anything_is_made(tmp_path, capsys, monkeypatch):
    err = _run_fails_fast(tmp_path, "name: x\nrun_root: {root}\nstages:\n"
                          "  a: {{kind: model.tiny, needs: [b]}}\n  b: {{kind: model.tiny, needs: [a]}}\n", capsys,
                          monkeypatch)
    assert "cycle among ['a', 'b']" in err


def test_merge_keys_may_be_overridden_without_being_duplicates(tmp_path):
    p = tmp_path / "wf.yaml"
    p.write_text("name: x\nstages:\n  a: {kind: data.synthetic, config: &c {seed: 1, n_train: 8}}\n"
                 "  b: {kind: data.synthetic, config: {<<: *c, seed: 2}}\n")
    c = load_workflow(p).stage_configs
    assert (c["a"].seed, c["b"].seed, c["b"].n_train) == (1, 2, 8)


def test_an_override_of_one_stage_leaves_the_stages_sharing_its_anchor_alone():
    base = load_workflow(ROOT / "workflows" / "tiny.yaml")
    wf = load_workflow(ROOT / "workflows" / "tiny.yaml", ["stages.sft.config.trainer.num_workers=1"])
    assert wf.stage_configs["sft"].trainer.num_workers == 1
    assert base.stage_configs["sft"].trainer.num_workers == 2
    for name in ("align", "round1_sft", "round3_sft", "grpo"):  # they share the trainer anchor in tiny.yaml
        assert wf.stage_configs[name].trainer == base.stage_configs[name].trainer, name


def test_a_bad_override_on_resume_changes_nothing(tmp_path, capsys):
    p = tmp_path / "wf.yaml"
    p.write_text(f"name: x\nrun_root: {tmp_path / 'runs'}\nstages:\n  a: {{kind: data.synthetic}}\n")
    run = Runner.create(load_workflow(p), tmp_path / "runs" / "r")
    before = (run.run_dir / "workflow.yaml").read_bytes()
    events = (run.run_dir / "events.jsonl").read_bytes() if (run.run_dir / "events.jsonl").exists() else b""
    assert main(["resume", str(run.run_dir), "stages.a.config.n_trian=3"]) == 2
    assert "stages.a.config.n_trian: Extra inputs are not permitted" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        Runner.open(run.run_dir, ["stages.a.config.seed=nope"])
    assert (run.run_dir / "workflow.yaml").read_bytes() == before
    assert ((run.run_dir / "events.jsonl").read_bytes() if (run.run_dir / "events.jsonl").exists() else b"") == events
    assert main(["status", str(run.run_dir)]) == 0
    # a good override is stored and recorded among the run's events
    Runner.open(run.run_dir, ["stages.a.config.seed=3"]).commit_overrides()
    assert "seed: 3" in (run.run_dir / "workflow.yaml").read_text()
    assert '"event": "overrides"' in (run.run_dir / "events.jsonl").read_text()


def test_a_partial_nested_mapping_extends_the_stages_own_default():
    from r1v.core.config import OptimConfig
    from r1v.rl.config import GRPOConfig

    own = GRPOConfig.model_fields["optim"].default
    c = GRPOConfig.model_validate({"model": "m", "corpus": "c", "optim": {"lr": 3e-6}})
    assert c.optim.lr == 3e-6
    # GRPO's constant rate and no weight decay stay; OptimConfig's cosine decay and 0.05 do not come back
    assert (c.optim.weight_decay, c.optim.min_lr_ratio, c.optim.warmup_ratio) == \
        (own.weight_decay, own.min_lr_ratio, own.warmup_ratio) == (0.0, 1.0, 0.0)
    assert OptimConfig().weight_decay == 0.05
    # the same through a workflow override of one key
    raw = {"name": "x", "stages": {"g": {"kind": "grpo", "config": {"model": "m", "corpus": "c"}}}}
    from r1v.core.overrides import apply_overrides
    from r1v.workflow.schema import validate_workflow

    wf = validate_workflow(apply_overrides(raw, ["stages.g.config.optim.lr=0.5"]))
    assert (wf.stage_configs["g"].optim.lr, wf.stage_configs["g"].optim.weight_decay) == (0.5, 0.0)
    # another stage kind's field default (eval samples at top_p 0.95) is kept the same way
    from r1v.eval.config import EvalConfig

    e = EvalConfig.model_validate({"model": "m", "corpus": "c", "sampling": {"temperature": 0.3}})
    assert (e.sampling.temperature, e.sampling.top_p) == (0.3, EvalConfig.model_fields["sampling"].default.top_p)
