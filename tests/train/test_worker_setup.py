"""The worker set-up that SFT and GRPO share (`r1v.train.worker.load_trainable`): the trainer's activation
checkpointing takes effect (fewer tensors saved for backward) and leaves the gradient as it was."""

from __future__ import annotations

import torch

from r1v.core.config import TrainerConfig
from r1v.model.config import TinySpec
from r1v.model.forward import multimodal_logits
from r1v.model.io import save_model
from r1v.model.tiny import build_tiny_vlm
from r1v.train.worker import load_trainable


def saved_and_grad(model) -> tuple[int, list[torch.Tensor]]:
    """Tensors autograd keeps in one forward, and the gradients of a next-token loss."""
    model.train()
    n = [0]
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
        logits = multimodal_logits(model, ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return n[0], [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_activation_checkpointing_is_applied_and_keeps_the_gradient(tmp_path):
    vlm, tok = build_tiny_vlm(TinySpec(num_layers=3))
    path = save_model(vlm, tok, tmp_path / "vlm")
    results = {}
    for on in (False, True):
        trainer = TrainerConfig(zero_stage=0, activation_checkpointing=on)
        model, _, counts = load_trainable(path, trainer, ["llm"])
        assert counts  # the freeze ran
        results[on] = saved_and_grad(model)
    (plain_saved, plain_grad), (ckpt_saved, ckpt_grad) = results[False], results[True]
    assert ckpt_saved * 2 < plain_saved, (ckpt_saved, plain_saved)
    assert len(plain_grad) == len(ckpt_grad) > 0
    for a, b in zip(plain_grad, ckpt_grad, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
