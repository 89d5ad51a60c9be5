import pydantic
import pytest
import torch

from r1v.model import TinySpec, build_tiny_llm, build_tiny_vlm, image_token_id, num_image_tokens, tile_size
from r1v.model.tokens import IMG_CONTEXT


def _prompt_ids(tokenizer, n_tiles: int, per_tile: int) -> dict[str, torch.Tensor]:
    text = f"<|im_start|>user\n<img>{IMG_CONTEXT * (n_tiles * per_tile)}</img>\nHow many?<|im_end|>\n"
    return tokenizer(text + "<|im_start|>assistant\n<think>\n", return_tensors="pt", add_special_tokens=False)


def test_tiny_vlm_layout(vlm, tokenizer, spec) -> None:
    assert vlm.config.image_token_id == image_token_id(vlm) == tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert vlm.config.downsample_ratio == 0.5
    assert tile_size(vlm) == spec.tile_size
    assert num_image_tokens(vlm) == (56 // 14) ** 2 // 4 == vlm.config.image_seq_length
    assert vlm.lm_head.out_features == len(tokenizer)
    assert vlm.model.multi_modal_projector.linear_2.out_features == spec.hidden_size


def test_forward_and_generate_with_image(vlm, tokenizer, pixel_values) -> None:
    inputs = _prompt_ids(tokenizer, pixel_values.shape[0], num_image_tokens(vlm))
    with torch.no_grad():
        logits = vlm(**inputs, pixel_values=pixel_values).logits
        out = vlm.generate(**inputs, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_same_seed_same_weights_other_seed_differs(spec, tokenizer) -> None:
    a, b, c = (build_tiny_llm(spec, tokenizer, seed=s) for s in (0, 0, 1))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.hidden_size == c.config.hidden_size and a.config.vocab_size == c.config.vocab_size


def test_building_does_not_touch_global_rng(spec, tokenizer) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_vlm(spec, tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_spec_validation_names_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="num_heads"):
        TinySpec(hidden_size=30, num_heads=4)
    with pytest.raises(pydantic.ValidationError, match="tile_size"):
        TinySpec(tile_size=42)
