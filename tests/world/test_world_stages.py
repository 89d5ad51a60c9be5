"""The world's stage kinds: corpora that keep the test held out, and the shipped backbones loaded and checked."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from r1v.world.build import WORLD_DIR, verify_world
from r1v.world.corpora import generate
from r1v.world.domain import split_of


def _tuples(path) -> set[tuple[int, ...]]:
    return {tuple(int(ch) for ch in json.loads(m)["digits"]) for m in pq.read_table(path).column("meta").to_pylist()}


def test_corpora_keep_test_tuples_out_of_training(tmp_path) -> None:
    paths = generate(tmp_path, n_align=60, n_sft=60, n_grpo=30, n_test=45, seed=3, corrupt_rows=2)
    test = _tuples(paths["test"])
    train = _tuples(paths["align"]) | _tuples(paths["sft"]) | _tuples(paths["grpo"])
    assert not test & train
    assert all(split_of(d) == "test" for d in test) and all(split_of(d) == "train" for d in train)
    rows = pq.read_table(paths["test"]).to_pylist()
    metas = [json.loads(r["meta"]) for r in rows]
    assert sorted({m["level"] for m in metas}) == [1, 2, 3] and all(m["text_question"] for m in metas)
    assert all(r["messages"][0]["content"].startswith("<image>") and len(r["messages"]) == 1 for r in rows)
    sft = pq.read_table(paths["sft"]).to_pylist()
    assert all("</think>" in r["messages"][1]["content"] for r in sft)
    align = pq.read_table(paths["align"]).to_pylist()  # perception only: no arithmetic in alignment
    assert not any("Compute" in r["messages"][0]["content"] for r in align)
    again = generate(tmp_path / "again", n_align=60, n_sft=60, n_grpo=30, n_test=45, seed=3, corrupt_rows=2)
    assert pq.read_table(again["sft"]).equals(pq.read_table(paths["sft"]))


def test_shipped_world_verifies_and_a_tampered_copy_does_not(tmp_path) -> None:
    manifest = verify_world(WORLD_DIR)
    acc = manifest["text_accuracy"]
    assert acc["reasoning"]["accuracy"] > acc["instruct"]["accuracy"]
    copy = tmp_path / "world"
    shutil.copytree(WORLD_DIR, copy)
    weights = next(copy.glob("reasoning_llm/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksums"):
        verify_world(copy)


def test_substitute_vlm_is_the_shipped_tower_and_instruct_llm(tmp_path) -> None:
    import torch

    from r1v.model.io import load_llm, load_model
    from r1v.world.load import substitute_vlm

    out = substitute_vlm(None, seed=0, out=tmp_path / "vlm")
    vlm, tok = load_model(out["model"])
    llm, _ = load_llm(out["instruct_llm"])
    assert torch.equal(vlm.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    names = [type(m).__name__ for m in vlm.model.multi_modal_projector.children()]
    assert names[:2] == ["LayerNorm", "Linear"] and names[-1] == "Linear"  # R1V's projector
    other = substitute_vlm(None, seed=1, out=tmp_path / "vlm1")
    vlm1, _ = load_model(other["model"])
    assert not torch.equal(vlm.model.multi_modal_projector.linear_1.weight,
                           vlm1.model.multi_modal_projector.linear_1.weight)


def test_world_build_command_writes_a_verifiable_world_and_names_bad_keys(tmp_path, capsys) -> None:
    from r1v.cli import main

    out = tmp_path / "w"
    small = ["base_steps=3", "child_steps=3", "vision_steps=3", "eval_items=6", "base_batch=2", "child_batch=2",
             "vision_batch=2"]
    assert main(["world", "build", "--out", str(out), *small]) == 0
    manifest = verify_world(out)
    assert manifest["build_config"]["base_steps"] == 3 and manifest["text_accuracy"]["reasoning"]["n"] == 6
    assert {"instruct_llm/model.safetensors", "reasoning_llm/model.safetensors",
            "vision_tower/model.safetensors"} <= set(manifest["files"])
    assert main(["world", "build", "--out", str(tmp_path / "x"), "base_stepz=3"]) == 2
    assert "base_stepz" in capsys.readouterr().err
