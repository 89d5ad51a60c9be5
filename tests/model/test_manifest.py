"""Projector-only stage outputs: the projector plus a manifest of the frozen parts (`r1v.model.manifest`).

The reference everywhere is what the stages wrote before: a full copy of the model (`save_model` of the model with
its new projector). A manifest directory must load to the same model, and `r1v export` must write the same tensors,
bit for bit; a base that moved or changed must be refused, naming the part and the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1v.cli import main
from r1v.model import build_tiny_llm, load_model, reassemble, save_llm, save_model
from r1v.model.convert_keys import hf_disk_key
from r1v.model.freeze import apply_freeze
from r1v.model.full_export import export_full
from r1v.model.io import load_llm
from r1v.model.manifest import (
    MANIFEST,
    PROJECTOR_FILE,
    ManifestError,
    model_tensors,
    part_record,
    read_manifest,
    reassemble_model,
    verify,
    write_projector_model,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R1V_CACHE_DIR", str(tmp_path / "cache"))


def _new_projector(model, seed: int) -> dict[str, torch.Tensor]:
    """Move `model`'s projector (as training would) and return its tensors under their HF names."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return {hf_disk_key(n): p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("model.multi_modal_projector.")}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


@pytest.fixture
def base(vlm, tokenizer, tmp_path) -> Path:
    return save_model(vlm, tokenizer, tmp_path / "base")


@pytest.fixture
def stage(base, tmp_path):
    """(the old full-copy output, the new manifest output) of a stage that moved the projector of `base`."""
    model, tok = load_model(base)
    projector = _new_projector(model, 1)
    return save_model(model, tok, tmp_path / "full"), write_projector_model(tmp_path / "stage", base, projector)


def test_projector_only_output_is_projector_sized(base, stage) -> None:
    _, out = stage
    names = sorted(p.name for p in out.iterdir())
    assert PROJECTOR_FILE in names and MANIFEST in names and "config.json" in names
    assert not [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    proj = load_file(str(out / PROJECTOR_FILE))
    assert proj and all(k.startswith("multi_modal_projector.") for k in proj)
    proj_bytes = sum(t.numel() * t.element_size() for t in proj.values())
    assert (out / PROJECTOR_FILE).stat().st_size < proj_bytes + 4096  # the tensors and a header, nothing else
    weights = (base / "model.safetensors").stat().st_size
    # the base's side files (config, tokenizer), the projector and a few KB of manifest: no weight of the base
    assert _dir_bytes(out) < _dir_bytes(base) - weights + proj_bytes + 8192
    m = read_manifest(out)
    assert {n: (Path(r["path"]), r["layout"]) for n, r in m["parts"].items()} == {
        "vision_tower": (base, "vlm"), "language_model": (base, "vlm")}
    assert all(len(r["sha256"]) == 64 for r in m["parts"].values())


def test_export_of_a_manifest_equals_the_old_full_copy_bit_for_bit(stage, tmp_path) -> None:
    full, out = stage
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported"
    assert not (exported / MANIFEST).exists() and (exported / "config.json").is_file()
    _assert_same_tensors(_tensors(full), _tensors(exported))
    # loading the manifest directory itself gives the same model as loading the full copy
    _assert_same_model(load_model(full)[0], load_model(out)[0])
    _assert_same_model(load_model(full)[0], load_model(exported)[0])
    _assert_same_tensors(_tensors(full), {k: read() for k, read in model_tensors(out)})
    from r1v.train.loading import checkpoint_tensors  # what ZeRO-3 loading streams

    _assert_same_tensors(_tensors(full), {k: read() for k, read in checkpoint_tensors(out)})
    # sharded: the same tensors, an index naming them
    sharded = export_full(out, tmp_path / "sharded", max_shard_bytes=100_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(_tensors(full))
    _assert_same_tensors(_tensors(full), _tensors(sharded))


def test_export_to_the_internvl_chat_layout(stage, tmp_path) -> None:
    full, out = stage
    assert main(["export", str(out), "--out", str(tmp_path / "chat"), "--layout", "internvl-chat"]) == 0
    chat = tmp_path / "chat"
    assert any(k.startswith("mlp1.") for k in _tensors(chat)) and not (chat / MANIFEST).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".chat.hf-")]  # the HF step is gone
    _assert_same_model(load_model(full)[0], load_model(chat)[0])


def test_loading_a_manifest_reads_no_weights_to_check_them(stage, monkeypatch) -> None:
    _, out = stage
    import r1v.model.checksums as checksums

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(checksums, "_file_sha256", no_hashing)
    load_model(out)  # sizes and mtimes as recorded: the recorded digests stand


def test_a_changed_base_is_refused_naming_part_and_path(vlm, tokenizer, base, stage) -> None:
    _, out = stage
    os.utime(base / "model.safetensors", ns=(1, 1))  # touched, same bytes: hashed again, still loads
    load_model(out)
    with torch.no_grad():
        vlm.model.vision_tower.embeddings.cls_token.add_(1.0)
    save_model(vlm, tokenizer, base)  # the base is rewritten with other weights
    with pytest.raises(ManifestError, match=rf"part 'vision_tower' at {base} has changed"):
        load_model(out)
    assert main(["export", str(out), "--out", str(base.parent / "x")]) == 2
    assert not (base.parent / "x").exists()


def test_a_moved_base_is_refused(base, stage, tmp_path) -> None:
    _, out = stage
    base.rename(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match=rf"part 'vision_tower' is built on {base}, which does not exist"):
        load_model(out)


def test_a_chain_of_manifests_resolves(base, stage, tmp_path) -> None:
    full, first = stage
    model, tok = load_model(first)
    second = write_projector_model(tmp_path / "second", first, _new_projector(model, 2))
    # written flat: the second stage names the original parts, not the first stage
    assert read_manifest(second)["parts"] == read_manifest(first)["parts"]
    assert read_manifest(second)["built_from"] == str(first)
    expected = save_model(model, tok, tmp_path / "second_full")
    _assert_same_model(load_model(expected)[0], load_model(second)[0])

    # a manifest whose parts are another manifest's (a chain on disk) resolves through it
    chained = tmp_path / "chained"
    chained.mkdir()
    for f in second.iterdir():
        (chained / f.name).write_bytes(f.read_bytes())
    m = read_manifest(second)
    m["parts"] = {n: part_record(first, "manifest", n) for n in m["parts"]}
    (chained / MANIFEST).write_text(json.dumps(m))
    assert verify(chained) == {"vision_tower": (base, "vlm"), "language_model": (base, "vlm")}
    _assert_same_model(load_model(expected)[0], load_model(chained)[0])
    assert main(["export", str(chained), "--out", str(tmp_path / "chained_full")]) == 0
    _assert_same_tensors(_tensors(expected), _tensors(tmp_path / "chained_full"))
    # the link is checked too: the first manifest naming other parts breaks the chain
    mf = read_manifest(first)
    mf["parts"]["language_model"]["sha256"] = "0" * 64
    (first / MANIFEST).write_text(json.dumps(mf))
    with pytest.raises(ManifestError, match="part 'language_model' at .*/stage has changed"):
        load_model(chained)


def test_reassemble_writes_a_manifest_equal_to_the_old_full_copy(spec, tokenizer, base, stage, tmp_path) -> None:
    _, aligned = stage
    llm_dir = save_llm(build_tiny_llm(spec, tokenizer, seed=5), tokenizer, tmp_path / "reasoning_llm")
    out = reassemble_model(aligned, llm_dir, tmp_path / "reassembled")
    m = read_manifest(out)
    assert (m["parts"]["vision_tower"]["path"], m["parts"]["vision_tower"]["layout"]) == (str(base), "vlm")
    assert (m["parts"]["language_model"]["path"], m["parts"]["language_model"]["layout"]) == (str(llm_dir), "llm")
    _assert_same_tensors(load_file(str(aligned / PROJECTOR_FILE)), load_file(str(out / PROJECTOR_FILE)))
    # the old stage: load both, reassemble in memory, save a full copy
    llm, tok = load_llm(llm_dir)
    old = save_model(reassemble(load_model(aligned)[0], llm, tok), tok, tmp_path / "old")
    _assert_same_model(load_model(old)[0], load_model(out)[0])
    export_full(out, tmp_path / "exported")
    _assert_same_tensors(_tensors(old), _tensors(tmp_path / "exported"))
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((old / "config.json").read_text())


def test_training_export_writes_a_manifest_or_streams_a_full_checkpoint(base, tmp_path) -> None:
    from types import SimpleNamespace

    from r1v.train.engine import export_model

    model, tok = load_model(base)
    _new_projector(model, 3)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    apply_freeze(model, ["projector"])
    export_model(SimpleNamespace(module=model), str(base), tmp_path / "proj", rank=0)
    assert (tmp_path / "proj" / MANIFEST).is_file()
    loaded = load_model(tmp_path / "proj")[0]
    assert torch.equal(loaded.model.multi_modal_projector.linear_1.weight,
                       model.model.multi_modal_projector.linear_1.weight)
    assert not torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # frozen: the base's, as it must be

    apply_freeze(model, ["projector", "llm"])
    export_model(SimpleNamespace(module=model), str(tmp_path / "proj"), tmp_path / "all", rank=0)
    assert not (tmp_path / "all" / MANIFEST).exists()
    _assert_same_tensors(_tensors(save_model(model, tok, tmp_path / "old")), _tensors(tmp_path / "all"))
    assert (tmp_path / "all" / "r1v_checksums.json").is_file()


def test_export_finds_the_model_of_a_run_or_stage_directory(base, stage, tmp_path) -> None:
    from r1v.cli.export import ExportError, model_dir_of

    _, out = stage
    run = tmp_path / "run"
    (run / "stages" / "models").mkdir(parents=True)
    (run / "stages" / "sft").mkdir()
    (run / "stages" / "eval").mkdir()
    (run / "run.json").write_text("{}")
    (run / "workflow.yaml").write_text(
        "name: t\nstages:\n  models: {kind: model.tiny}\n"
        "  sft: {kind: sft, config: {model: '@models.model', corpus: c}}\n"
        "  eval: {kind: eval, config: {model: '@sft.model', corpus: c}}\n")

    def state(name: str, **outputs: str) -> None:
        (run / "stages" / name / "state.json").write_text(json.dumps({"status": "done", "outputs": outputs}))

    state("models", model=str(base), llm=str(base))
    state("sft", model=str(out))
    state("eval", predictions="p", summary="s")
    assert model_dir_of(run) == out
    assert model_dir_of(run, "models") == base
    assert model_dir_of(run / "stages" / "sft") == out
    assert model_dir_of(out) == out
    with pytest.raises(ExportError, match="no stage 'ghost'"):
        model_dir_of(run, "ghost")
    assert main(["export", str(run), "--stage", "sft", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "model.safetensors").is_file()
