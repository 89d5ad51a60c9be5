"""A top-level `seed` reseeds every stage (`r1v run wf.yaml seed=3`), and the fingerprints follow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from r1v.core.config import ConfigError
from r1v.workflow.runner import Runner
from r1v.workflow.schema import load_workflow

TINY = Path(__file__).resolve().parent.parent / "workflows" / "tiny.yaml"

WORKFLOW = {
    "name": "seeded",
    "stages": {
        "data": {"kind": "data.synthetic", "config": {"n_train": 4, "n_test": 2, "seed": 7}},
        "models": {"kind": "model.tiny", "config": {"seed": 0, "reasoning_seed": 1}},
        "sft": {"kind": "sft", "config": {"model": "@models.model", "corpus": "@data.train"}},
        "grpo": {"kind": "grpo", "config": {"model": "@sft.model", "corpus": "@data.train",
                                            "trainer": {"seed": 11}}},
        "eval": {"kind": "eval", "config": {"model": "@grpo.model", "corpus": "@data.test"}},
    },
}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "wf.yaml"
    p.write_text(yaml.safe_dump(WORKFLOW))
    return p


def seeds(m: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Every field named `seed` or `*_seed`, at any depth, by dotted path."""
    out: dict[str, Any] = {}
    for name in type(m).model_fields:
        v = getattr(m, name)
        if name == "seed" or name.endswith("_seed"):
            out[prefix + name] = v
        elif isinstance(v, BaseModel):
            out.update(seeds(v, f"{prefix}{name}."))
    return out


def test_seed_reaches_every_stage_and_nested_trainer(path: Path) -> None:
    wf = load_workflow(path, ["seed=3"])
    got = {name: seeds(c) for name, c in wf.stage_configs.items()}
    assert got == {"data": {"seed": 3}, "models": {"seed": 3, "reasoning_seed": 4},
                   "sft": {"trainer.seed": 3}, "grpo": {"trainer.seed": 3}, "eval": {"seed": 3}}
    assert wf.config.seed == 3


def test_without_seed_configs_keep_their_own(path: Path) -> None:
    wf = load_workflow(path)
    assert wf.config.seed is None
    assert wf.stage_configs["data"].seed == 7 and wf.stage_configs["grpo"].trainer.seed == 11
    assert wf.stage_configs["models"].reasoning_seed == 1


def test_fingerprints_change_with_the_seed(path: Path, tmp_path: Path) -> None:
    fps = {s: Runner(load_workflow(path, [] if s is None else [f"seed={s}"]), tmp_path).fingerprints()
           for s in (None, 3, 4)}
    for stage in WORKFLOW["stages"]:
        assert len({fps[s][stage] for s in fps}) == 3, stage
    assert Runner(load_workflow(path, ["seed=3"]), tmp_path).fingerprints() == fps[3]


def test_invalid_seed_and_unknown_keys_still_name_the_field(path: Path) -> None:
    with pytest.raises(ConfigError, match=r"seed: Input should be a valid integer"):
        load_workflow(path, ["seed=abc"])
    with pytest.raises(ConfigError, match=r"stages\.data\.config\.sede"):
        load_workflow(path, ["seed=3", "stages.data.config.sede=1"])


def test_demo_workflow_reseeds() -> None:
    """`r1v run workflows/tiny.yaml seed=5`: every stage's seeds follow, whatever stages the demo has."""
    found = [(k, v) for c in load_workflow(TINY, ["seed=5"]).stage_configs.values() for k, v in seeds(c).items()]
    assert found and all(v == 5 if k.split(".")[-1] == "seed" else v > 5 for k, v in found)


def test_reseeding_keeps_what_was_set_and_what_was_left_to_default(tmp_path: Path) -> None:
    """A distill stage in the `generated` scope, its sampling left to the defaults, loads under `seed=N` (a reseed
    that marked every default as given made its one-scope check see a second, conflicting scope); the reseeded
    config equals the one loaded without the seed but for its seeds."""
    p = tmp_path / "wf.yaml"
    p.write_text(yaml.safe_dump({"name": "d", "stages": {"distill": {"kind": "distill", "config": {
        "model": "m", "corpus": "c", "judge": {"kind": "rule"}, "penalty_scope": "generated",
        "sampling": {"temperature": 0.6}}}}}))
    plain, seeded = (load_workflow(p, o).stage_configs["distill"] for o in ([], ["seed=4"]))
    assert seeded.seed == 4 and seeded.sampling_dict()["repetition_penalty_scope"] == "generated"
    assert seeded.model_dump(exclude={"seed"}) == plain.model_dump(exclude={"seed"})
