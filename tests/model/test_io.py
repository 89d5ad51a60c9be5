from pathlib import Path

import pytest
import torch

from r1v.core.fs import atomic_directory
from r1v.model import build_tiny_llm, load_llm, load_model, reassemble, save_llm, save_model


def _ids(model, n_tiles: int) -> torch.Tensor:
    return torch.tensor([[3, 4, *[model.config.image_token_id] * (4 * n_tiles), 5, 6]])


def test_round_trip_identical_outputs(vlm, tokenizer, pixel_values, tmp_path: Path) -> None:
    save_model(vlm, tokenizer, tmp_path / "vlm")
    loaded, loaded_tok = load_model(tmp_path / "vlm")
    ids = _ids(vlm, pixel_values.shape[0])
    with torch.no_grad():
        expected = vlm(input_ids=ids, pixel_values=pixel_values).logits
        got = loaded(input_ids=ids, pixel_values=pixel_values).logits
    assert torch.equal(expected, got)
    assert loaded.config.image_token_id == vlm.config.image_token_id
    assert loaded.config.r1v_special_token_ids == vlm.config.r1v_special_token_ids
    assert loaded_tok.encode("<img><IMG_CONTEXT></img>") == tokenizer.encode("<img><IMG_CONTEXT></img>")
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id


def test_save_replaces_existing_dir_and_leaves_no_temp(vlm, tokenizer, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_model(vlm, tokenizer, target)
    save_model(vlm, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _atomic_dir(path: Path, write) -> None:
    """What save_model does around save_pretrained."""
    with atomic_directory(path) as tmp:
        write(tmp)


def test_failed_save_keeps_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    _atomic_dir(target, lambda d: (d / "v1.txt").write_text("1"))

    def broken(d: Path) -> None:
        (d / "partial.txt").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic_dir(target, broken)
    assert [p.name for p in target.iterdir()] == ["v1.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_llm_round_trip_then_reassemble(vlm, tokenizer, spec, tmp_path: Path) -> None:
    reasoning = build_tiny_llm(spec, tokenizer, seed=3)
    save_llm(reasoning, tokenizer, tmp_path / "reasoning")
    llm, llm_tok = load_llm(tmp_path / "reasoning")
    assert all(torch.equal(a, b) for a, b in zip(llm.parameters(), reasoning.parameters(), strict=True))
    new = reassemble(vlm, llm, llm_tok)
    save_model(new, llm_tok, tmp_path / "r1v")
    loaded, _ = load_model(tmp_path / "r1v")
    assert torch.equal(loaded.lm_head.weight, reasoning.lm_head.weight)
    assert torch.equal(
        loaded.model.multi_modal_projector.linear_1.weight, vlm.model.multi_modal_projector.linear_1.weight
    )
