"""Config loading: YAML + `a.b=c` overrides, validated at load with errors naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1v.core.config import ConfigError
from r1v.eval.config import EvalConfig
from r1v.train.config import SFTConfig
from r1v.workflow.schema import load_workflow

TINY = Path(__file__).resolve().parent.parent / "workflows" / "tiny.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "wf.yaml"
    p.write_text(text)
    return p


def test_tiny_workflow_loads_with_typed_stage_configs():
    wf = load_workflow(TINY)
    rounds = [f"round{t}_{s}" for t in (1, 2, 3) for s in ("generate", "select", "sft", "eval")]
    assert list(wf.config.stages)[:19] == ["data", "models", "align", "reassemble", "sft", "rm", *rounds, "grpo"]
    roles = {c.report_stage or c.report_baseline for c in wf.stage_configs.values() if isinstance(c, EvalConfig)}
    assert roles == {"reassemble", "sft", "round1_sft", "round2_sft", "round3_sft", "grpo", "no_image",
                     "shuffled_image", "substitute_vlm", "text_reasoning", "text_instruct"}
    assert [wf.stage_configs[f"round{t}_select"].tau for t in (1, 2, 3)] == [3, 4, 5]
    assert wf.stage_configs["grpo"].model == "@round3_sft.model"
    sft = wf.stage_configs["sft"]
    assert isinstance(sft, SFTConfig) and sft.trainable == ["projector"] and sft.optim.lr == 1e-3


def test_overrides_set_nested_values_with_yaml_types():
    wf = load_workflow(TINY, ["stages.sft.config.optim.lr=0.5", "stages.grpo.config.rewards={accuracy: 2}",
                              "stages.sft.config.max_steps=3"])
    assert wf.stage_configs["sft"].optim.lr == 0.5
    assert wf.stage_configs["sft"].max_steps == 3
    assert wf.stage_configs["grpo"].rewards == {"accuracy": 2.0}


def test_an_override_may_name_a_stage_output_and_bad_yaml_is_a_config_error():
    wf = load_workflow(TINY, ["stages.reassemble.config.model=@models.model"])  # '@' starts no YAML token
    assert wf.stage_configs["reassemble"].model == "@models.model"
    with pytest.raises(ConfigError, match=r"override 'stages.sft.config.optim.lr=\[1': the value is not YAML"):
        load_workflow(TINY, ["stages.sft.config.optim.lr=[1"])


def test_unknown_key_names_file_and_key():
    with pytest.raises(ConfigError) as e:
        load_workflow(TINY, ["stages.sft.config.optim.learning_rate=1"])
    assert str(TINY) in str(e.value) and "stages.sft.config.optim.learning_rate" in str(e.value)


def test_ill_typed_value_names_key_and_value(tmp_path):
    p = write(tmp_path, "name: x\nstages:\n  s:\n    kind: sft\n    config: {model: m, corpus: c, epochs: many}\n")
    with pytest.raises(ConfigError, match=r"wf.yaml: stages.s.config.epochs: .*integer.*'many'"):
        load_workflow(p)


def test_unknown_stage_kind_and_need(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage kind 'sftt'; known: .*sft"):
        load_workflow(write(tmp_path, "name: x\nstages:\n  s: {kind: sftt}\n"))
    with pytest.raises(ConfigError, match="stages.s.needs: unknown stage 'nope'"):
        load_workflow(write(tmp_path, "name: x\nstages:\n  s: {kind: model.tiny, needs: [nope]}\n"))


def test_bad_override_syntax_and_top_level_typo(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_workflow(TINY, ["stages.sft.config.lr"])
    with pytest.raises(ConfigError, match="wf.yaml: stagez: Extra inputs"):
        load_workflow(write(tmp_path, "name: x\nstages: {}\nstagez: {}\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_workflow(tmp_path / "missing.yaml")
