"""The GRPO variants' maths on hand-computed small cases: advantages, loss aggregations, clip-higher, dual clip,
truncated importance sampling, the rollout/trainer mismatch, dynamic sampling, the Selective Sample Buffer; and
the two properties the update loop relies on: micro-batched accumulation and unequal ranks give exactly the
gradient of one big batch, given the global normaliser."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from r1v.generation.engines import token_logprobs
from r1v.rl.algos import (
    ADVANTAGES,
    LOSS_AGG,
    POLICY_LOSSES,
    clipped_surrogate,
    logprob_mismatch,
    ppo_clip,
    tis_weights,
)
from r1v.rl.sampling import SelectiveSampleBuffer, dynamic_sample, informative_groups

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def test_registries_name_the_variants():
    assert {"grpo", "dr_grpo", "mean_centred"} <= set(ADVANTAGES.names())
    assert LOSS_AGG.names() == sorted(AGGS)
    assert {"ppo_clip", "clipped_surrogate"} <= set(POLICY_LOSSES.names())
    assert POLICY_LOSSES.get("clipped_surrogate") is POLICY_LOSSES.get("ppo_clip")


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    # mean 0.25, population std sqrt(0.25 * 0.75) = sqrt(3)/4: (1 - 0.25) / (sqrt(3)/4) = sqrt(3)
    grpo = ADVANTAGES.get("grpo")(r)
    assert torch.allclose(grpo[0], torch.tensor([math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3),
                                                 -1 / math.sqrt(3)]), atol=1e-5)
    dr = ADVANTAGES.get("dr_grpo")(r)
    assert torch.equal(dr, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(grpo[1], torch.zeros(4))


def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2: an empty completion
    tm, smm, sms = (LOSS_AGG.get(n) for n in AGGS)
    assert tm.normaliser(m) == 4 and smm.normaliser(m) == 2 and sms.normaliser(m) == 2
    assert tm(x, m).item() == pytest.approx(10 / 4)  # (1 + 2 + 3 + 4) / 4 tokens
    assert smm(x, m).item() == pytest.approx((2 + 4) / 2)  # mean of the sequences' token means
    assert sms(x, m).item() == pytest.approx((6 + 4) / 2)  # mean of the sequences' token sums
    assert tm(x, m, norm=5.0).item() == pytest.approx(2.0)  # a given norm replaces this batch's count
    assert smm(x, m, norm=4.0).item() == pytest.approx(1.5)
    assert sms(x, torch.zeros_like(m)).item() == 0  # nothing masked in: zero, not NaN


def _loss(ratio: float, adv: float, **kw) -> tuple[float, float, dict[str, float]]:
    """Per-token loss, its gradient wrt logp, and the stats, for one token at `ratio`."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    per_token, st = ppo_clip(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), **kw)
    per_token.sum().backward()
    return per_token.item(), logp.grad.item(), {k: v.item() for k, v in st.items()}


def test_clip_higher_by_hand():
    kw = {"clip_eps_low": 0.2, "clip_eps_high": 0.28}
    loss, grad, st = _loss(1.25, 1.0, **kw)  # above 1 + eps_low but below 1 + eps_high: not clipped
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and st["clip"] == 0
    loss, grad, st = _loss(1.5, 1.0, **kw)  # above 1 + eps_high with A > 0: clipped, no gradient
    assert loss == pytest.approx(-1.28) and grad == 0 and st["clip_high"] == 1 and st["clip_low"] == 0
    loss, grad, st = _loss(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.2)  # symmetric: that one clips
    assert loss == pytest.approx(-1.2) and grad == 0 and st["clip_high"] == 1
    loss, grad, st = _loss(0.75, -1.0, **kw)  # below 1 - eps_low with A < 0: clipped at 0.8
    assert loss == pytest.approx(0.8) and grad == 0 and st["clip_low"] == 1 and st["clip"] == 1
    loss, grad, st = _loss(0.85, -1.0, **kw)
    assert loss == pytest.approx(0.85) and grad == pytest.approx(0.85) and st["clip"] == 0
    loss, grad, st = _loss(1.5, -1.0, **kw)  # A < 0 is not clipped above: the loss keeps growing with r
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and st["clip"] == 0


def test_dual_clip_bounds_negative_advantages():
    r = math.exp(3.0)  # a ratio of ~20
    loss, grad, st = _loss(r, -2.0, clip_eps_low=0.2, clip_eps_high=0.2)
    assert loss == pytest.approx(2 * r, rel=1e-5) and grad == pytest.approx(2 * r, rel=1e-5)
    assert st["dual_clip"] == 0  # off
    loss, grad, st = _loss(r, -2.0, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=3.0)
    assert loss == pytest.approx(3.0 * 2.0) and grad == 0 and st["dual_clip"] == 1
    loss, grad, st = _loss(2.0, -2.0, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=3.0)  # r < c: untouched
    assert loss == pytest.approx(4.0) and grad == pytest.approx(4.0) and st["dual_clip"] == 0
    loss, _, st = _loss(r, 2.0, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=3.0)  # A > 0: ordinary clip
    assert loss == pytest.approx(-2.4) and st["dual_clip"] == 0 and st["clip_high"] == 1
    with pytest.raises(ValueError, match="dual_clip_c"):
        _loss(1.0, 1.0, dual_clip_c=1.0)


def test_tis_weights_cap_and_scale_the_loss():
    old = torch.log(torch.tensor([[1.0, 2.0, 4.0, 0.5, 9.0]]))
    rollout = torch.zeros(1, 5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w = tis_weights(old.requires_grad_(), rollout, mask, cap=3.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 3.0, 0.5, 1.0]])) and not w.requires_grad
    logp = torch.zeros(1, 5, requires_grad=True)
    adv = torch.tensor([1.0])
    base, _ = ppo_clip(logp, torch.zeros(1, 5), adv, mask)
    weighted, _ = ppo_clip(logp, torch.zeros(1, 5), adv, mask, weights=w)
    assert torch.allclose(weighted, base * w)
    weighted.sum().backward()
    assert torch.allclose(logp.grad, -w)  # d(-r A w)/dlogp at r = 1, A = 1


def test_logprob_mismatch_by_hand():
    trainer = torch.tensor([[0.0, math.log(2.0), 5.0]])
    rollout = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the 5.0 is padding and must not count
    s = logprob_mismatch(trainer, rollout, mask)
    ln2 = math.log(2.0)
    assert s["abs_diff_mean"].item() == pytest.approx(ln2 / 2)
    assert s["abs_diff_max"].item() == pytest.approx(ln2)
    assert s["ratio_mean"].item() == pytest.approx(1.5)  # (1 + 2) / 2
    assert s["kl_k1"].item() == pytest.approx(-ln2 / 2)  # mean of log rollout - log trainer
    assert s["kl_k3"].item() == pytest.approx((2 - ln2 - 1) / 2)  # mean of exp(d) - d - 1
    assert logprob_mismatch(trainer, rollout, torch.zeros(1, 3))["abs_diff_max"].item() == 0


def test_clipped_surrogate_is_ppo_clip_token_mean():
    gen = torch.Generator().manual_seed(1)
    logp, old = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    adv, mask = torch.randn(3, generator=gen), (torch.rand(3, 4, generator=gen) > 0.3).float()
    per_token, st = ppo_clip(logp, old, adv, mask, clip_eps_low=0.1, clip_eps_high=0.1)
    loss, frac = clipped_surrogate(logp, old, adv, mask, 0.1, tokens=7.0)
    assert torch.allclose(loss, LOSS_AGG.get("token_mean")(per_token, mask, 7.0))
    assert torch.allclose(frac, (st["clip"] * mask).sum() / 7.0)


# ---- micro-batches and ranks: the global normaliser makes them compose exactly ----

V, H = 11, 5


def _rows(seed: int, lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    """Sequences of the given response lengths: input features, targets, old log-probs (off the current policy,
    so some tokens clip) and an advantage each."""
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, H, generator=gen), "y": torch.randint(0, V, (n,), generator=gen),
             "old_shift": 0.5 * torch.randn(n, generator=gen), "adv": torch.randn((), generator=gen)}
            for n in lengths]


def _pad(rows: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Right-pad to the longest row of *this* batch (micro-batches thus have different widths)."""
    t = max(len(r["y"]) for r in rows)
    x, y = torch.zeros(len(rows), t, H), torch.zeros(len(rows), t, dtype=torch.long)
    shift, mask = torch.zeros(len(rows), t), torch.zeros(len(rows), t)
    for i, r in enumerate(rows):
        n = len(r["y"])
        x[i, :n], y[i, :n], shift[i, :n], mask[i, :n] = r["x"], r["y"], r["old_shift"], 1.0
    return x, y, shift, torch.stack([r["adv"] for r in rows]), mask


def _grad(model: torch.nn.Linear, batches: list[list[dict[str, torch.Tensor]]], agg: str,
          norm: float | None) -> torch.Tensor:
    """The gradient accumulated by backpropagating agg(loss) of each batch in turn with the same `norm`."""
    model.zero_grad()
    for rows in batches:
        x, y, shift, adv, mask = _pad(rows)
        logp = token_logprobs(model(x), y)
        old = (logp + shift).detach()
        per_token, _ = ppo_clip(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0)
        LOSS_AGG.get(agg)(per_token, mask, norm).backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_give_the_big_batch_gradient(agg):
    """Tolerance: fp32, atol 1e-6 (the sums differ only in summation order)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(H, V)
    rows = _rows(0, [2, 9, 4, 0, 7, 3])  # one empty completion: it must not count as a sequence
    micro = [rows[:1], rows[1:4], rows[4:]]  # unequal sizes and widths
    big = _grad(model, [rows], agg, None)
    norm = sum(LOSS_AGG.get(agg).normaliser(_pad(mb)[-1]) for mb in micro)
    assert torch.allclose(_grad(model, micro, agg, norm), big, atol=1e-6, rtol=0)
    naive = _grad(model, micro, agg, None) / len(micro)  # a mean of per-micro-batch means is not it
    assert not torch.allclose(naive, big, atol=1e-4)


@pytest.mark.parametrize("agg", AGGS)
def test_unequal_ranks_average_to_the_global_gradient(agg):
    """Two simulated ranks (short answers on one, long on the other), each with two micro-batches: DeepSpeed's
    mean over ranks of the gradients with norm = global count / world equals the gradient over the union.
    Tolerance: fp32, atol 1e-6."""
    torch.manual_seed(0)
    model = torch.nn.Linear(H, V)
    ranks = [_rows(1, [1, 2, 2]), _rows(2, [9, 8, 10, 7, 12])]
    micro = [[r[:2], r[2:]] for r in ranks]
    world = len(ranks)
    norm = sum(LOSS_AGG.get(agg).normaliser(_pad(mb)[-1]) for rank in micro for mb in rank) / world
    averaged = sum(_grad(model, rank, agg, norm) for rank in micro) / world
    union = _grad(model, [ranks[0] + ranks[1]], agg, None)
    assert torch.allclose(averaged, union, atol=1e-6, rtol=0)
    naive = sum(_grad(model, [r], agg, None) for r in ranks) / world  # each rank its own mean
    assert not torch.allclose(naive, union, atol=1e-4)


# ---- dynamic sampling ----

def test_informative_groups():
    assert informative_groups(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, 0.5]])) == [True, False, False]
    assert informative_groups([[0.0, 1e-9]], atol=1e-6) == [False]


def test_dynamic_sampling_refills_and_counts_reconcile():
    # round 0: groups 0..3, 1 and 3 uninformative; round 1 is asked for the 2 missing and gives 3 informative
    script = {0: [[1, 0], [1, 1], [0, 1], [0, 0]], 1: [[1, 0], [0, 1], [1, 0]]}
    asked = []

    def generate(r: int, n: int):
        asked.append((r, n))
        rewards = script[r][: max(n, 3)]
        return [f"r{r}g{i}" for i in range(len(rewards))], rewards

    out = dynamic_sample(generate, needed=4, max_rounds=5)
    assert asked == [(0, 4), (1, 2)]
    assert out.groups == ["r0g0", "r0g2", "r1g0", "r1g1"] and out.filled
    assert out.uninformative == ["r0g1", "r0g3"]
    assert (out.generated, out.dropped, out.surplus, out.rounds) == (7, 2, 1, 2)
    assert out.generated == len(out.groups) + out.dropped + out.surplus


def test_dynamic_sampling_respects_its_bound():
    calls = []

    def all_equal(r: int, n: int):
        calls.append(n)
        return list(range(n)), [[1.0, 1.0]] * n

    out = dynamic_sample(all_equal, needed=3, max_rounds=4, oversample=1.5)
    assert out.rounds == 4 and len(calls) == 4 and calls == [5, 5, 5, 5]  # ceil(3 * 1.5)
    assert out.groups == [] and not out.filled and out.dropped == out.generated == 20
    out = dynamic_sample(lambda r, n: ([], []), needed=3, max_rounds=4)  # the data ran out: stop
    assert out.rounds == 1 and out.generated == 0


# ---- Selective Sample Buffer ----

def test_ssb_keeps_nonzero_advantages_up_to_capacity():
    buf: SelectiveSampleBuffer[str] = SelectiveSampleBuffer(capacity=3)
    assert buf.extend(["a", "b", "c", "d", "e"], [0.0, 1.0, -3.0, 0.0, 2.0]) == 3
    assert not buf.add("nan", float("nan"))
    assert {s for s, _ in buf.sample(200)} == {"b", "c", "e"}
    buf.add("f", 0.5)  # full: the oldest ("b") goes
    assert len(buf) == 3 and {s for s, _ in buf.sample(200)} == {"c", "e", "f"}
    assert buf.replay_count(n_samples=8, n_zero=5) == 3  # no more than it holds
    assert buf.replay_count(n_samples=8, n_zero=5, max_fraction=0.25) == 2
    assert buf.replay_count(n_samples=8, n_zero=0) == 0
    assert SelectiveSampleBuffer(4).replay_count(8, 5) == 0  # empty buffer: nothing to replay


def test_ssb_draws_in_proportion_to_abs_advantage():
    """20000 draws with a fixed seed; tolerance 0.015 on each frequency (> 4 binomial standard deviations)."""
    buf: SelectiveSampleBuffer[str] = SelectiveSampleBuffer(capacity=10, seed=3)
    buf.extend(["x", "y", "z"], [1.0, -3.0, 6.0])
    draws = buf.sample(20000)
    assert all(a == {"x": 1.0, "y": -3.0, "z": 6.0}[s] for s, a in draws)  # each comes with its advantage
    freq = {k: sum(s == k for s, _ in draws) / len(draws) for k in "xyz"}
    for k, p in {"x": 0.1, "y": 0.3, "z": 0.6}.items():
        assert abs(freq[k] - p) < 0.015, freq
    distinct = buf.sample(5, replace=False)
    assert sorted(s for s, _ in distinct) == ["x", "y", "z"]


def test_ssb_state_round_trips_and_is_deterministic():
    buf: SelectiveSampleBuffer[dict] = SelectiveSampleBuffer(capacity=4, seed=7)
    for i in range(6):
        buf.add({"prompt": i, "token_ids": [i, i + 1]}, (-1) ** i * (i + 1))
    buf.sample(3)  # advance the generator: its state must travel too
    state = json.loads(json.dumps(buf.state_dict()))  # fits a JSON checkpoint
    assert state == pickle.loads(pickle.dumps(buf.state_dict()))
    again: SelectiveSampleBuffer[dict] = SelectiveSampleBuffer(capacity=4, seed=999)
    again.load_state_dict(state)
    assert len(again) == 4 and again.sample(10) == buf.sample(10)
    fresh = [SelectiveSampleBuffer(capacity=4, seed=7) for _ in range(2)]
    for b in fresh:
        b.extend(["p", "q"], [1.0, 2.0])
    assert fresh[0].sample(30) == fresh[1].sample(30)
    rng_draw = fresh[0].sample(30, rng=np.random.default_rng(0))
    assert rng_draw == fresh[1].sample(30, rng=np.random.default_rng(0))
    small: SelectiveSampleBuffer[dict] = SelectiveSampleBuffer(capacity=2)
    small.load_state_dict(state)  # a smaller capacity keeps the newest
    assert {s["prompt"] for s, _ in small.sample(50)} == {4, 5}
