"""GRPO learns: on a reward the tiny model can move, the mean reward rises within a bounded number of steps."""

from __future__ import annotations

import pytest

from r1v.rl.config import GRPOConfig
from r1v.workflow import tracking


def reward_history(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


@pytest.mark.slow
def test_grpo_mean_reward_rises(ray_cluster, tiny_assets, tmp_path):
    from r1v.rl.grpo import train_grpo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "grpo-test")
    run = tracking.start_run(uri, exp, "grpo")
    steps = 16
    cfg = GRPOConfig(
        model=tiny_assets["model"], corpus=tiny_assets["train"], trainable=["projector", "llm"],
        steps=steps, prompts_per_step=2, group_size=8, kl_coef=0.0,
        rewards={"digits": 1.0}, reward_modules=["r1v_test_rewards"],
        optim={"lr": 1e-2, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        sampling={"temperature": 1.0, "max_new_tokens": 16}, checkpoint_every=100,
        trainer={"seed": 0},
    )
    train_grpo(cfg, tmp_path / "grpo", uri, run)
    rewards = reward_history(uri, run, "reward")
    assert len(rewards) == steps
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print("reward per step:", [round(r, 3) for r in rewards])
    assert last > first * 1.5 and last - first > 0.05, rewards
