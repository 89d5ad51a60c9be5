import pytest
import torch

from r1v.model import GROUPS, apply_freeze, multimodal_logits, param_group_of, trainable_state_dict


def _sizes(model) -> dict[str, int]:
    m = model.model
    return {
        "vision": sum(p.numel() for p in m.vision_tower.parameters()),
        "projector": sum(p.numel() for p in m.multi_modal_projector.parameters()),
        "llm": sum(p.numel() for p in m.language_model.parameters()) + model.lm_head.weight.numel(),
    }


def test_param_groups() -> None:
    assert param_group_of("model.vision_tower.encoder.layer.0.attention.q_proj.weight") == "vision"
    assert param_group_of("model.multi_modal_projector.linear_1.weight") == "projector"
    assert param_group_of("model.language_model.layers.0.mlp.up_proj.weight") == "llm"
    assert param_group_of("lm_head.weight") == "llm"
    assert param_group_of("module.model.multi_modal_projector.layer_norm.bias") == "projector"
    with pytest.raises(ValueError, match="'model.other.weight'"):
        param_group_of("model.other.weight")


def test_every_parameter_has_a_group(vlm) -> None:
    assert {param_group_of(n) for n, _ in vlm.named_parameters()} == set(GROUPS)


def test_default_trains_projector_only(vlm) -> None:
    sizes = _sizes(vlm)
    counts = apply_freeze(vlm)
    assert counts == {"vision": 0, "projector": sizes["projector"], "llm": 0}
    trainable = trainable_state_dict(vlm)
    assert trainable and all(k.startswith("model.multi_modal_projector.") for k in trainable)
    assert sum(v.numel() for v in trainable.values()) == sizes["projector"]
    name, tensor = next(iter(trainable.items()))
    assert not tensor.requires_grad
    assert tensor.data_ptr() != vlm.get_parameter(name).data_ptr()


def test_several_groups_and_back(vlm) -> None:
    sizes = _sizes(vlm)
    counts = apply_freeze(vlm, ("vision", "llm"))
    assert counts == {"vision": sizes["vision"], "projector": 0, "llm": sizes["llm"]}
    assert apply_freeze(vlm, ()) == dict.fromkeys(GROUPS, 0)
    assert not any(p.requires_grad for p in vlm.parameters())


def test_unknown_group_named(vlm) -> None:
    with pytest.raises(ValueError, match="'decoder'"):
        apply_freeze(vlm, ("projector", "decoder"))


def test_gradients_reach_projector_only(vlm, pixel_values) -> None:
    apply_freeze(vlm)
    ids = torch.tensor([[1, *[vlm.config.image_token_id] * (4 * pixel_values.shape[0]), 2, 3]])
    multimodal_logits(vlm, ids, None, pixel_values).logsumexp(-1).sum().backward()
    for name, p in vlm.named_parameters():
        if param_group_of(name) == "projector":
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
