"""The GRPO update's phases without Ray: chunked response log-probs, micro-batches that give the big batch's
gradient, mini-batches as optimizer steps, one vision pass per prompt, old log-probs reused, dynamic sampling
and the replay buffer in the rollout phase."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from r1v.generation.engines import Completion
from r1v.rl.config import GRPOConfig


class LocalEngine:
    """The DeepSpeed-engine calls the update makes, around a plain module: gradients accumulate in `.grad`
    until `step()`, which records them (so a test can compare them) and applies plain SGD."""

    def __init__(self, module: torch.nn.Module, lr: float = 0.0) -> None:
        self.module, self.lr, self.grads = module, lr, []
        self.device = torch.device("cpu")

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def set_gradient_accumulation_boundary(self, flag: bool) -> None:
        pass

    def step(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.grads.append([p.grad.detach().clone() for p in params])
        with torch.no_grad():
            for p in params:
                p -= self.lr * p.grad
                p.grad = None

    def parameters(self):
        return self.module.parameters()


@pytest.fixture(scope="module")
def tiny():
    from r1v.model import build_tiny_vlm
    from r1v.model.assemble import num_image_tokens, tile_size
    from r1v.model.freeze import apply_freeze

    torch.manual_seed(0)
    model, tok = build_tiny_vlm()
    apply_freeze(model, ["projector"])
    return model.eval(), tok, tile_size(model.config), num_image_tokens(model.config)


def rollout(tiny, prompts: int = 3, group: int = 4, seed: int = 0):
    """Prompts with 1-2 tiles and groups of completions of unequal lengths, half of them right."""
    from r1v.rl.update import RolloutBatch

    model, _, t, per_tile = tiny
    rng = np.random.default_rng(seed)
    rows, comps = [], []
    for i in range(prompts):
        tiles = 1 + i % 2
        rows.append({"id": f"p{i}", "_index": i, "answer": "7", "n_tiles": tiles,
                     "input_ids": [model.config.image_token_id] * (tiles * per_tile) + [5, 6, 7 + i],
                     "pixel_values": rng.integers(0, 255, (tiles, 3, t, t), dtype=np.uint8).tobytes()})
        comps.append([Completion(rng.integers(10, 90, 2 + (3 * j + i) % 7).tolist(),
                                 rng.normal(-3, 1, 2 + (3 * j + i) % 7).tolist(),
                                 "a </think> \\boxed{7}" if (i + j) % 2 else "a </think> \\boxed{1}", True)
                      for j in range(group)])
    return RolloutBatch(rows, comps)


def cfg(**kw) -> GRPOConfig:
    base = dict(model="m", corpus="c", prompts_per_step=3, group_size=4, rewards={"accuracy": 1.0})
    return GRPOConfig(**{**base, **kw})


def test_response_logprobs_match_full_logits_for_any_chunk(tiny):
    from r1v.data.collate import tiles_from_bytes
    from r1v.generation.engines import token_logprobs
    from r1v.model.forward import multimodal_logits, vision_features
    from r1v.rl.logprobs import build_batch, response_logprobs

    model, tok, t, _ = tiny
    rb = rollout(tiny)
    b = build_batch(rb.prompts, rb.completions, tok.pad_token_id)
    feats = vision_features(model, torch.cat([torch.from_numpy(tiles_from_bytes(p["pixel_values"], p["n_tiles"], t)
                                                                .copy()) for p in rb.samples]))
    with torch.no_grad():
        full = token_logprobs(multimodal_logits(model, b["input_ids"], b["attention_mask"], features=feats)[:, :-1],
                              b["input_ids"][:, 1:], 0.7) * b["response_mask"]
        for chunk in (1, 5, 10_000):
            got = response_logprobs(model, b["input_ids"], b["attention_mask"], b["response_mask"], feats, 0.7,
                                    chunk=chunk)
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert (got[b["response_mask"] == 0] == 0).all()
    assert b["rollout_valid"].tolist() == [1.0] * 12


def projector_grad(tiny, c: GRPOConfig):
    from r1v.rl.update import grpo_update

    model, tok, t, _ = tiny
    engine = LocalEngine(copy.deepcopy(model))
    out = grpo_update(engine, rollout(tiny), c, tok.pad_token_id, t, world=1)
    return engine.grads, out


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batches_give_the_big_batch_gradient(tiny, agg):
    """fp32, atol 1e-6 (float summation order is the only difference)."""
    (big,), _ = projector_grad(tiny, cfg(loss_agg=agg))
    for micro in (1, 3, 4):
        (small,), out = projector_grad(tiny, cfg(loss_agg=agg, micro_batch=micro))
        assert out["optimizer_steps"] == 1
        for a, b in zip(big, small, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in big)


def test_mini_batches_are_optimizer_steps_and_old_logprobs_are_reused_once(tiny):
    model = tiny[0]
    calls = []
    hook = model.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        # deepcopy copies hooks too: each forward of the copy's LLM counts
        _, out = projector_grad(tiny, cfg(micro_batch=2))
        one_step = len(calls)
        calls.clear()
        grads, out2 = projector_grad(tiny, cfg(micro_batch=2, ppo_mini_batch=6))
        two_steps = len(calls)
        calls.clear()
        _, out3 = projector_grad(tiny, cfg(micro_batch=2, ppo_epochs=2))
        two_epochs = len(calls)
    finally:
        hook.remove()
    assert out["optimizer_steps"] == 1 and out2["optimizer_steps"] == 2 and len(grads) == 2
    assert out3["optimizer_steps"] == 2
    # 12 samples in micro-batches of 2: 6 forwards when the update reuses its own pass as the old log-probs;
    # a second mini-batch needs its old log-probs first (3 more); a second epoch reuses the first's (6 more)
    assert (one_step, two_steps, two_epochs) == (6, 9, 12)


def test_a_nonfinite_mini_batch_is_skipped_and_reported(tiny):
    from r1v.rl.update import grpo_update, score_phase

    model, tok, t, _ = tiny
    c = cfg(micro_batch=2, ppo_mini_batch=6)
    rb = score_phase(rollout(tiny), c)
    rb.advantages[7] = float("nan")  # a sample of the second mini-batch
    engine = LocalEngine(copy.deepcopy(model), lr=0.1)
    out = grpo_update(engine, rb, c, tok.pad_token_id, t, world=1)
    assert out["optimizer_steps"] == 1 and len(engine.grads) == 1  # only the first mini-batch stepped
    [(where, skipped)] = out["nonfinite"]
    assert where == "PPO epoch 0, mini-batch 1" and skipped.nonfinite == "loss and grad norm"
    assert all(p.grad is None for p in engine.module.parameters())  # its gradients were dropped
    assert out["grad_norm"] > 0


def test_one_vision_pass_per_prompt_with_a_frozen_tower(tiny):
    calls = []
    hook = tiny[0].model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        projector_grad(tiny, cfg(micro_batch=2, ppo_epochs=2, kl_coef=0.0))
    finally:
        hook.remove()
    assert len(calls) == 1  # one batched pass over the 3 prompts' tiles, reused by every forward


def test_mismatch_is_measured_against_the_engines_logprobs(tiny):
    _, out = projector_grad(tiny, cfg())
    assert out["mismatch_tokens"] == out["loss_tokens"] > 0
    # the fake engine log-probs are N(-3, 1): far from the model's, so the mismatch is large
    assert out["mismatch_abs_sum"] / out["mismatch_tokens"] > 0.5


def test_truncated_importance_weights_scale_the_gradient(tiny):
    (plain,), _ = projector_grad(tiny, cfg())
    (tis,), _ = projector_grad(tiny, cfg(tis_cap=1e-3))  # every weight capped at 1e-3
    for a, b in zip(plain, tis, strict=True):
        torch.testing.assert_close(b, a * 1e-3, atol=1e-9, rtol=1e-4)


def test_config_names_unknown_variants_and_bad_batch_sizes():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown advantage estimator 'nope'; known: dr_grpo, grpo"):
        cfg(advantage="nope")
    with pytest.raises(ValidationError, match="loss_agg"):
        cfg(loss_agg="sum_everything")
    with pytest.raises(ValidationError, match="ppo_mini_batch 5 must divide"):
        cfg(ppo_mini_batch=5)
    with pytest.raises(ValidationError, match="micro_batch 4 must divide ppo_mini_batch 6"):
        cfg(ppo_mini_batch=6, micro_batch=4)
    with pytest.raises(ValidationError, match="num_gpus 2.0 per vllm engine must equal vllm.tensor_parallel_size 1"):
        cfg(engine={"kind": "vllm", "num_gpus": 2})
    assert cfg(engine={"kind": "vllm", "num_gpus": 2, "vllm": {"tensor_parallel_size": 2}}).engine.kind_options()[
        "tensor_parallel_size"] == 2
    c = cfg(clip_eps=0.1, clip_eps_high=0.28)
    assert (c.clip_eps_low, c.clip_eps_high) == (0.1, 0.28)


def fixed_generate(tiny, right: dict[int, int]):
    """Engine stand-in for the rollout phase: prompt i gets `right[i]` correct answers out of 4."""
    def generate(ps, r):
        return [[Completion([11, 12], [-1.0, -1.0], "x </think> \\boxed{7}" if j < right[p["_index"]] else
                            "x </think> \\boxed{2}", True) for j in range(4)] for p in ps]
    return generate


def test_dynamic_sampling_refills_with_informative_groups_and_pads_with_weight_zero(tiny):
    from r1v.rl.rollout import collect

    rows = rollout(tiny, prompts=6).prompts
    right = {0: 0, 1: 2, 2: 4, 3: 1, 4: 0, 5: 0}  # informative: 1 and 3 only
    order = {0: [0, 1, 2], 1: [3, 4, 5], 2: [0, 2, 4]}
    c = cfg(dynamic_sampling={"enabled": True, "max_rounds": 3})
    rb, stats, rounds = collect(fixed_generate(tiny, right), lambda r: [rows[i] for i in order[r]], c)
    assert len(rounds) == 3 and stats["rollout_rounds"] == 3
    assert [p["_index"] for p in rb.prompts] == [1, 3, 0]  # two informative, then a dropped one as filler
    assert rb.loss_weight.tolist() == [1.0] * 8 + [0.0] * 4
    assert stats["groups_dropped"] == 7 and stats["groups_filler"] == 1
    rb2, stats2, rounds2 = collect(fixed_generate(tiny, {i: 1 for i in range(6)}), lambda r: rows[:3], c)
    assert len(rounds2) == 1 and stats2["groups_filler"] == 0 and rb2.loss_weight.tolist() == [1.0] * 12


def test_replay_puts_buffered_samples_in_place_of_zero_advantage_groups(tiny):
    from r1v.rl.rollout import collect, replay
    from r1v.rl.sampling import SelectiveSampleBuffer

    rows = rollout(tiny, prompts=3).prompts
    c = cfg(replay={"enabled": True, "capacity": 16, "max_fraction": 0.5})
    buf = SelectiveSampleBuffer(16)
    rng = np.random.default_rng(0)
    rb, _, _ = collect(fixed_generate(tiny, {0: 2, 1: 0, 2: 4}), lambda r: rows, c)
    out, n = replay(rb, buf, c, rows, rng)
    assert n == 0 and out is rb and len(buf) == 4  # nothing stored yet to replay; group 0's samples stored
    rb, _, _ = collect(fixed_generate(tiny, {0: 2, 1: 0, 2: 4}), lambda r: rows, c)
    out, n = replay(rb, buf, c, rows, rng)
    assert n == 4  # one zero-advantage group replaced (the 6-sample budget fits one group of 4)
    assert len(out.flat) == 12 and len(out.prompts) == 2 + 4
    assert all(abs(float(a)) == pytest.approx(1.0, abs=1e-5) for a in out.advantages[-4:])  # group 0: 1,1,0,0
    assert all(cp.logprobs == [] for g in out.completions[-4:] for cp in g)
    assert out.loss_weight.tolist() == [1.0] * 12


def test_activation_checkpointing_keeps_the_gradient(tiny):
    from r1v.train.engine import apply_activation_checkpointing

    (plain,), _ = projector_grad(tiny, cfg())
    model = copy.deepcopy(tiny[0])
    apply_activation_checkpointing(model)
    (ckpt,), _ = projector_grad((model, *tiny[1:]), cfg())

    def saved(m) -> int:  # tensors autograd keeps for backward in one LLM forward
        n = [0]
        x = torch.randn(1, 5, m.config.text_config.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
            m.model.language_model(inputs_embeds=x)
        return n[0]

    assert saved(model) * 4 < saved(tiny[0])  # checkpointed: only the layers' inputs are kept
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
