import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from r1v.model import ReassemblyError, TinySpec, build_tiny_llm, build_tiny_tokenizer, reassemble
from r1v.model.assemble import assemble
from r1v.model.tokenizer import build_tiny_tokenizer as _tok
from r1v.model.tokens import THINK_END


def _groups(model) -> tuple[dict, dict]:
    sd = model.state_dict()
    backbone = {
        k: v for k, v in sd.items() if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }
    llm = {k: v for k, v in sd.items() if k not in backbone}
    return backbone, llm


def test_reassembly_carries_vision_and_projector_and_takes_new_llm(
    vlm, tokenizer, spec, pixel_values
) -> None:
    reasoning = build_tiny_llm(spec, tokenizer, seed=7)
    new = reassemble(vlm, reasoning, tokenizer)
    old_backbone, old_llm = _groups(vlm)
    new_backbone, new_llm = _groups(new)
    assert old_backbone.keys() == new_backbone.keys() and old_llm.keys() == new_llm.keys()
    assert all(torch.equal(old_backbone[k], new_backbone[k]) for k in old_backbone)
    reasoning_sd = {
        k.replace("model.", "model.language_model.", 1): v for k, v in reasoning.state_dict().items()
    }
    assert new_llm.keys() == reasoning_sd.keys()
    assert all(torch.equal(v, reasoning_sd[k]) for k, v in new_llm.items())
    assert not torch.equal(new_llm["lm_head.weight"], old_llm["lm_head.weight"])
    ids = torch.tensor([[1, *[new.config.image_token_id] * (4 * pixel_values.shape[0]), 2]])
    with torch.no_grad():
        assert new(input_ids=ids, pixel_values=pixel_values).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_refuses_other_hidden_size(vlm, tokenizer) -> None:
    wide = build_tiny_llm(TinySpec(hidden_size=96), tokenizer)
    with pytest.raises(ReassemblyError, match="LLM hidden size 96 does not match the projector output 64"):
        reassemble(vlm, wide, tokenizer)


def test_refuses_small_vocab(vlm, tokenizer, spec) -> None:
    small_tok = _tok(vocab_size=400)
    small = build_tiny_llm(spec, small_tok)
    with pytest.raises(ReassemblyError, match="400 rows but the tokenizer has 512"):
        reassemble(vlm, small, tokenizer)


def test_refuses_missing_special_token(vlm, tokenizer, spec) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != THINK_END]
    lacking = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    assert THINK_END not in lacking.get_vocab()
    with pytest.raises(ReassemblyError, match=f"tokenizer has no token '{THINK_END}'"):
        reassemble(vlm, build_tiny_llm(spec, tokenizer), lacking)


def test_refuses_moved_special_token(vlm, spec) -> None:
    moved = build_tiny_tokenizer(vocab_size=500)
    llm = build_tiny_llm(spec, build_tiny_tokenizer())
    with pytest.raises(
        ReassemblyError, match="token '<img>' has id 495 in the new tokenizer but 507 in the VLM"
    ):
        reassemble(vlm, llm, moved)


def test_assemble_checks_projector_output(vlm, tokenizer) -> None:
    wide = build_tiny_llm(TinySpec(hidden_size=96), tokenizer)
    with pytest.raises(ReassemblyError, match="LLM hidden size 96 does not match the projector output 64"):
        assemble(
            vlm.model.vision_tower,
            vlm.model.multi_modal_projector,
            wide,
            tokenizer,
            vision_config=vlm.config.vision_config,
        )


def test_reassembly_keeps_feature_selection(vlm, tokenizer, spec) -> None:
    vlm.config.vision_feature_layer = -2
    new = reassemble(vlm, build_tiny_llm(spec, tokenizer, seed=5), tokenizer)
    assert new.config.vision_feature_layer == -2
    assert new.config.downsample_ratio == vlm.config.downsample_ratio
    assert new.config.vision_config.to_dict() == vlm.config.vision_config.to_dict()
