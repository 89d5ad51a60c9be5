"""Batch placement and collectives go through `r1v.train.device`: checked on the meta device, where a tensor left
on the host makes the step fail, as it would on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1v.train.device import collective_device, engine_device, engine_dtype, to_device


class DeviceEngine:
    """The parts of a DeepSpeed engine the SFT step and the GRPO update use, around a module on any device
    (DeepSpeed itself cannot run on the meta device)."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.module, self.device, self.steps = module, torch.device(device), 0

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def set_gradient_accumulation_boundary(self, flag: bool) -> None:
        pass

    def step(self) -> None:
        self.steps += 1

    def parameters(self):
        return self.module.parameters()


def tiny_vlm_on(device: str, dtype: torch.dtype = torch.float32):
    from r1v.model import build_tiny_vlm
    from r1v.model.freeze import apply_freeze

    model, tok = build_tiny_vlm()
    apply_freeze(model, ["projector"])
    return model.to(device=device, dtype=dtype), tok


def test_to_device_moves_nested_tensors_and_casts_only_floats():
    batch = {"ids": torch.ones(2, 3, dtype=torch.long), "x": [torch.zeros(2), (torch.ones(1), "keep")], "n": 3}
    out = to_device(batch, "meta", torch.bfloat16)
    assert out["ids"].device.type == "meta" and out["ids"].dtype == torch.long
    assert out["x"][0].device.type == "meta" and out["x"][0].dtype == torch.bfloat16
    assert out["x"][1][0].device.type == "meta" and out["x"][1][1] == "keep" and out["n"] == 3


def test_collectives_use_the_host_without_a_process_group():
    assert collective_device() == torch.device("cpu")


def test_engine_device_and_dtype():
    lin = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert engine_device(lin) == torch.device("cpu") and engine_dtype(lin) == torch.bfloat16
    assert engine_device(DeviceEngine(lin, "meta")) == torch.device("meta")


def test_collectives_use_the_current_gpu_under_pure_nccl(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in [("nccl", torch.device("cuda", 3)), ("cpu:gloo,cuda:nccl", torch.device("cpu")),
                          ("gloo", torch.device("cpu"))]:
        monkeypatch.setattr(dist, "get_backend", lambda b=backend: b)
        assert collective_device() == want, backend


class Placements:
    """Records what the step hands to `to_device` (then places it for real)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, torch.device]] = []

    def __call__(self, obj, device, dtype=None):
        self.calls.append((obj, torch.device(device)))
        return to_device(obj, device, dtype)

    def placed(self, tensor: torch.Tensor) -> bool:
        def walk(o):
            if isinstance(o, torch.Tensor):
                yield o
            elif isinstance(o, dict):
                for v in o.values():
                    yield from walk(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    yield from walk(v)
        return any(t is tensor for obj, _ in self.calls for t in walk(obj))


def test_sft_step_places_the_batch_through_the_helper(monkeypatch):
    import r1v.train.sft as sft
    from r1v.data.collate import IGNORE
    from r1v.model.assemble import num_image_tokens, tile_size

    spy = Placements()
    monkeypatch.setattr(sft, "to_device", spy)
    model, _ = tiny_vlm_on("cpu", torch.bfloat16)
    engine = DeviceEngine(model, "cpu")
    t, per_tile = tile_size(model.config), num_image_tokens(model.config)
    ids = torch.randint(0, 100, (2, per_tile + 6))
    ids[:, :per_tile] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :per_tile] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.zeros(2, 3, t, t, dtype=torch.uint8)}  # built on the host, as collate does
    sft.sft_step(engine, [batch], packing=False, world=1)
    assert engine.steps == 1
    assert all(spy.placed(batch[k]) for k in batch) and {d for _, d in spy.calls} == {engine.device}
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and grad.dtype == torch.bfloat16


def test_grpo_update_places_everything_through_the_helper_in_the_engine_dtype(monkeypatch):
    import r1v.rl.update as update
    from r1v.generation.engines import Completion
    from r1v.model.assemble import num_image_tokens, tile_size
    from r1v.rl.config import GRPOConfig

    spy = Placements()
    monkeypatch.setattr(update, "to_device", spy)
    dtype = torch.bfloat16
    model, tok = tiny_vlm_on("cpu", dtype)
    engine = DeviceEngine(model, "cpu")
    ref = update.reference_projector(model, engine_device(engine), engine_dtype(engine))
    assert next(ref.parameters()).dtype == dtype and not next(ref.parameters()).requires_grad
    t, per_tile = tile_size(model.config), num_image_tokens(model.config)
    rng = np.random.default_rng(0)
    prompts = [{"id": f"p{i}", "input_ids": [model.config.image_token_id] * per_tile + [5, 6, 7],
                "pixel_values": rng.integers(0, 255, (1, 3, t, t), dtype=np.uint8).tobytes(), "n_tiles": 1,
                "answer": "7"} for i in range(2)]
    comps = [[Completion([9, 10, 11], [], "a </think> \\boxed{7}" if j % 2 else "a </think> \\boxed{1}", True)
              for j in range(4)] for _ in prompts]
    cfg = GRPOConfig(model="m", corpus="c", group_size=4, kl_coef=0.1, rewards={"accuracy": 1.0})
    out = update.grpo_update(engine, update.RolloutBatch(prompts, comps), cfg, tok.pad_token_id, t, 1, ref)
    assert engine.steps == 1 and out["total"] == [0.0, 1.0, 0.0, 1.0] * 2
    # the batch, the tiles and the advantages all went through the helper, to the engine's device
    kinds = [type(o).__name__ for o, _ in spy.calls]
    assert kinds.count("dict") == 1 and kinds.count("Tensor") == 2, kinds
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and grad.dtype == dtype
    assert np.isfinite(out["loss"]) and out["kl"] == 0.0  # on-policy, first step: the policy is the reference


def test_kl_needs_frozen_backbones():
    from pydantic import ValidationError

    from r1v.rl.config import GRPOConfig

    GRPOConfig(model="m", corpus="c", kl_coef=0.1)  # projector only: fine
    GRPOConfig(model="m", corpus="c", kl_coef=0.0, trainable=["projector", "llm"])  # no KL: fine
    with pytest.raises(ValidationError, match=r"kl_coef 0.1 > 0 with trainable \['llm'\]"):
        GRPOConfig(model="m", corpus="c", kl_coef=0.1, trainable=["projector", "llm"])


def test_trainer_dtype_defaults_to_bf16_on_gpus_only():
    from r1v.core.config import TrainerConfig

    assert TrainerConfig().dtype == "float32"
    assert TrainerConfig(use_gpu=True).dtype == "bfloat16"
    assert TrainerConfig(use_gpu=True, dtype="float32").dtype == "float32"
    assert TrainerConfig(use_gpu=True).model_dump()["dtype"] == "bfloat16"  # resolved in the logged config
