"""A reward that keeps failing stops GRPO: past `max_reward_failure_fraction` of a step's samples the stage fails
naming the reward and its first error, instead of training on zeros and ending `done`."""

from __future__ import annotations

import pytest

from r1v.grading.rewards import RewardFailureError, check_failure_fraction, failures_by_reward, score_safe


def test_score_safe_reports_each_rewards_first_failure():
    import r1v_test_rewards  # noqa: F401  (registers `broken_parser`, which has no quick path: forked workers)

    errors: dict[str, str] = {}
    _, per, failures = score_safe(["a", "b"], [{"answer": "1"}, {"answer": "2"}],
                                  {"broken_parser": 1.0, "digits": 1.0}, errors=errors)
    assert per["broken_parser"] == [0.0, 0.0] and failures == {"broken_parser/error/ValueError": 2}
    assert errors == {"broken_parser": "ValueError: cannot parse answer '1': grammar not loaded"}


def test_the_bound_is_on_each_rewards_share_of_the_step():
    failed = failures_by_reward({"accuracy/timeout": 1, "accuracy/error/ValueError": 1, "format/error/KeyError": 1,
                                 "accuracy_v2/error/ValueError": 5}, ["accuracy", "format"])
    assert failed == {"accuracy": 2, "format": 1}
    check_failure_fraction(failed, 20, 0.1, {}, "step 4")  # 2/20 is not more than 10%
    check_failure_fraction({"accuracy": 20}, 20, 1.0, {}, "step 4")  # 1: never
    with pytest.raises(RewardFailureError, match=r"^reward 'accuracy' failed on 2/16 samples of step 4 "
                       r"\(> 10%, max_reward_failure_fraction\): timed out \(over 5 s\)$"):
        check_failure_fraction(failed, 16, 0.1, {"accuracy": "timed out (over 5 s)"}, "step 4")
    with pytest.raises(RewardFailureError, match="'format' failed on 1/16"):
        check_failure_fraction({"accuracy": 0, "format": 1}, 16, 0.0, {}, "step 4")  # 0: any failure


@pytest.mark.slow
def test_an_always_raising_reward_fails_grpo_naming_it(ray_cluster, tiny_assets, tmp_path):
    from r1v.rl.config import GRPOConfig
    from r1v.rl.grpo import train_grpo

    cfg = GRPOConfig(model=tiny_assets["model"], corpus=tiny_assets["train"], steps=2, prompts_per_step=1,
                     group_size=2, rewards={"digits": 1.0, "broken_parser": 0.5}, reward_modules=["r1v_test_rewards"],
                     sampling={"max_new_tokens": 4}, checkpoint_every=1, trainer={"num_workers": 1})
    # Ray Train raises its own error type; the worker's message says what happened (one worker: a second one would
    # fail alike, at the same step)
    with pytest.raises(Exception, match=r"reward 'broken_parser' failed on 2/2 samples of step 1 \(> 10%, "
                       r"max_reward_failure_fraction\): ValueError: cannot parse answer '\d+': grammar not loaded"):
        train_grpo(cfg, tmp_path / "grpo", None, None)
    assert not list((tmp_path / "grpo" / "ray" / "train").glob("step-*"))  # failed before the first update
    assert not (tmp_path / "grpo" / "model").exists()
