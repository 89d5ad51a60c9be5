"""`projector_norm_reg`: the penalty (||f|| / r - 1)^2 over the projector's outputs, r the mean token-embedding
norm, captured by a forward hook; and `backward_window`'s `reg_fn`, which adds it to the gradient but not to the
NLL it reports."""

from __future__ import annotations

import pytest
import torch

from r1v.train.config import SFTConfig


@pytest.fixture
def vlm_and_pixels():
    from r1v.model import TinySpec, build_tiny_tokenizer, build_tiny_vlm

    spec = TinySpec()
    model, _ = build_tiny_vlm(spec, build_tiny_tokenizer())
    pixels = torch.randn(3, 3, spec.tile_size, spec.tile_size, generator=torch.Generator().manual_seed(0))
    return model, pixels


def test_penalty_is_the_formula_over_every_captured_token(vlm_and_pixels) -> None:
    from r1v.model import image_features
    from r1v.train.projector_reg import ProjectorNormPenalty, embedding_norm

    model, pixels = vlm_and_pixels
    r = float(model.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    assert embedding_norm(model) == pytest.approx(r)
    pen = ProjectorNormPenalty(model, weight=0.5)
    assert pen.take() is None  # nothing went through the projector yet
    feats = torch.cat([image_features(model, pixels[:1]), image_features(model, pixels[1:])])  # two forwards
    expected = ((feats.norm(dim=-1) / r - 1) ** 2).mean()
    got = pen.take()
    assert got is not None and torch.allclose(got, expected)
    assert pen.last_ratio == pytest.approx(float((feats.detach().norm(dim=-1) / r).mean()), rel=1e-5)
    assert pen.take() is None  # take() empties the capture
    pen.remove()
    image_features(model, pixels)
    assert pen.take() is None  # the hook is gone


def test_penalty_alone_pulls_the_features_to_the_embedding_scale(vlm_and_pixels) -> None:
    from r1v.model import image_features
    from r1v.train.projector_reg import ProjectorNormPenalty

    model, pixels = vlm_and_pixels
    proj = model.model.multi_modal_projector
    with torch.no_grad():  # start far from the embeddings' scale, as an aligned projector does
        proj.linear_2.weight.mul_(30.0)
    pen = ProjectorNormPenalty(model, weight=1.0)
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    ratios = []
    for _ in range(60):
        image_features(model, pixels)
        loss = pen.take()
        ratios.append(pen.last_ratio)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ratios[0] > 3 and abs(ratios[-1] - 1) < 0.5 * abs(ratios[0] - 1)


def test_reg_fn_reaches_the_gradient_not_the_reported_nll() -> None:
    from r1v.train.sft import backward_window

    class Engine:  # the slice of DeepSpeed's engine that backward_window uses, on one rank
        def set_gradient_accumulation_boundary(self, flag: bool) -> None:
            pass

        def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
            loss.backward()

    w = torch.nn.Parameter(torch.tensor(2.0))
    batches = [torch.tensor(3.0), torch.tensor(1.0)]
    nll, tokens = backward_window(Engine(), batches, lambda b: w * b, [3, 1], world=1,
                                  reg_fn=lambda b: 10 * w**2 * b)
    assert nll == pytest.approx(2.0 * 4.0) and tokens == 4.0
    # d/dw of (w*3 + 10 w^2 * 3 + w*1 + 10 w^2 * 1) / 4 = (4 + 80 w) / 4 at w = 2
    assert float(w.grad) == pytest.approx((4 + 160) / 4)


def test_config_refuses_a_negative_weight() -> None:
    with pytest.raises(ValueError, match="projector_norm_reg"):
        SFTConfig(model="m", corpus="c", projector_norm_reg=-1.0)
