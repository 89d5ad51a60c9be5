"""The GRPO maths as pure functions: advantages, clipped surrogate, KL estimators, rewards."""

from __future__ import annotations

import pytest
import torch

from r1v.generation.engines import token_logprobs
from r1v.grading.rewards import REWARDS, extract_answer, score
from r1v.rl.algos import ADVANTAGES, KL_ESTIMATORS, clipped_surrogate, masked_mean


def test_grpo_advantages_are_group_normalised():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = ADVANTAGES.get("grpo")(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.equal(a[1], torch.zeros(4))  # a group with one reward value teaches nothing


def test_mean_centred_advantages_do_not_rescale():
    a = ADVANTAGES.get("mean_centred")(torch.tensor([[3.0, 1.0]]))
    assert torch.equal(a, torch.tensor([[1.0, -1.0]]))


def test_clipped_surrogate_clips_and_pushes_towards_advantage():
    loss_fn = clipped_surrogate
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, frac = loss_fn(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    assert frac == 0
    assert (logp.grad[0, :2] < 0).all() and (logp.grad[1] > 0).all()  # descent raises logp where adv > 0
    assert logp.grad[0, 2] == 0  # masked token
    far = torch.full((2, 3), 1.0)  # ratio e: outside the clip range for the positive advantage
    _, frac = loss_fn(far, old, adv, mask, clip_eps=0.2)
    assert frac == pytest.approx(2 / 5)


def test_k3_is_nonnegative_and_zero_at_reference():
    k3 = KL_ESTIMATORS.get("k3")
    logp = torch.randn(4, 5)
    assert torch.allclose(k3(logp, logp), torch.zeros(4, 5))
    assert (k3(logp, torch.randn(4, 5)) >= 0).all()


def test_token_logprobs_and_masked_mean():
    logits = torch.log(torch.tensor([[[0.25, 0.75]]]))
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), abs=1e-6)
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])) == 2.0


def test_unknown_estimator_names_the_known_ones():
    with pytest.raises(KeyError, match="known: dr_grpo, grpo"):
        ADVANTAGES.get("nope")


@pytest.mark.parametrize(("completion", "acc", "fmt"), [
    ("The numbers are 3 and 4. 3 + 4 = 7.\n</think>\nAnswer: \\boxed{7}", 1.0, 1.0),
    ("reasoning\n</think>\nAnswer: \\boxed{7.0}", 1.0, 1.0),
    ("reasoning \\boxed{7} but then\n</think>\nAnswer: \\boxed{8}", 0.0, 1.0),
    ("no closing tag, \\boxed{7}", 1.0, 0.0),
    ("</think> </think> \\boxed{7}", 1.0, 0.0),
    ("r\n</think>\n", 0.0, 0.0),
])
def test_accuracy_and_format_rewards(completion, acc, fmt):
    sample = {"answer": "7"}
    assert REWARDS.get("accuracy")(completion, sample) == acc
    assert REWARDS.get("format")(completion, sample) == fmt


def test_score_weights_rewards():
    total, per = score(["x\n</think>\n\\boxed{2}", "junk"], [{"answer": "2"}] * 2, {"accuracy": 1.0, "format": 0.5})
    assert total == [1.5, 0.0] and per["format"] == [1.0, 0.0]
    assert extract_answer("a \\boxed{1} </think> b") is None


def test_global_token_mean_over_ranks_weighs_every_token_alike():
    """With tokens = global response tokens / world, DeepSpeed's average over ranks of each rank's loss is the
    token mean over all ranks' tokens, however unevenly the responses are spread."""
    loss_fn = clipped_surrogate
    gen = torch.Generator().manual_seed(0)
    ranks = []
    for n_tok in (2, 11):  # rank 0: short responses, rank 1: long ones
        mask = torch.zeros(2, 12)
        mask[:, :n_tok] = 1
        ranks.append((torch.randn(2, 12, generator=gen), torch.randn(2, 12, generator=gen),
                      torch.randn(2, generator=gen), mask))
    world, total = len(ranks), sum(float(r[3].sum()) for r in ranks)
    per_rank = [loss_fn(lp, old, adv, mask, 0.2, tokens=total / world)[0] for lp, old, adv, mask in ranks]
    lp, old, adv, mask = (torch.cat(t) for t in zip(*ranks, strict=True))
    assert torch.allclose(sum(per_rank) / world, loss_fn(lp, old, adv, mask, 0.2)[0])
    assert masked_mean(torch.ones(3), torch.tensor([1.0, 1.0, 0.0]), tokens=4.0) == 0.5


def test_prompt_passes_are_seeded_permutations_and_resume_exactly():
    from r1v.rl.grpo import step_prompts

    n, per = 7, 3
    taken = [i for step in range(1, 15) for i in step_prompts(n, step, per, seed=5, rank=1)]  # 6 passes
    passes = [taken[k : k + n] for k in range(0, 6 * n, n)]
    assert all(sorted(p) == list(range(n)) for p in passes)  # each pass visits every prompt once
    assert len({tuple(p) for p in passes}) > 1  # and in a new order
    assert passes[0] != list(range(n))
    resumed = [i for step in range(9, 15) for i in step_prompts(n, step, per, seed=5, rank=1)]
    assert resumed == taken[8 * per :]  # a run resumed at step 9 takes what the uninterrupted one took
    assert step_prompts(n, 3, per, seed=5, rank=0) != step_prompts(n, 3, per, seed=5, rank=1)
    assert step_prompts(n, 3, per, seed=6, rank=1) != step_prompts(n, 3, per, seed=5, rank=1)
    assert [i for s in (1, 2, 3) for i in step_prompts(n, s, per, 5, 1, shuffle=False)] == [*range(7), 0, 1]
