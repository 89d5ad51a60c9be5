"""The SFT and GRPO stages under Ray Train + DeepSpeed in bf16, GRPO with the KL term on: the reference projector
and every batch follow the engine's device and dtype (fp32 copies next to a bf16 engine used to fail)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from r1v.rl.config import GRPOConfig
from r1v.train.config import SFTConfig
from r1v.workflow import tracking


@pytest.mark.slow
def test_sft_and_grpo_run_in_bf16_with_kl(ray_cluster, tiny_assets, tmp_path):
    from r1v.model.io import load_model
    from r1v.rl.grpo import train_grpo
    from r1v.train.sft import train_sft

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "bf16")
    # one worker: what is tested is the dtype each tensor meets, which a second rank does not change
    trainer = {"dtype": "bfloat16", "seed": 0, "num_workers": 1}
    sft_run = tracking.start_run(uri, exp, "sft")
    sft = SFTConfig(model=tiny_assets["model"], corpus=tiny_assets["train"], batch_size=2, max_steps=2,
                    checkpoint_every=100, trainer=trainer, optim={"lr": 1e-3})
    sft_out = train_sft(sft, tmp_path / "sft", uri, sft_run)
    grpo_run = tracking.start_run(uri, exp, "grpo")
    grpo = GRPOConfig(model=str(sft_out["model"]), corpus=tiny_assets["train"], steps=2, prompts_per_step=2,
                      group_size=4, kl_coef=0.1, rewards={"digits": 1.0},
                      reward_modules=["r1v_test_rewards"], sampling={"temperature": 1.0, "max_new_tokens": 8},
                      optim={"lr": 1e-2, "warmup_ratio": 0.0}, checkpoint_every=100, trainer=trainer)
    train_grpo(grpo, tmp_path / "grpo", uri, grpo_run)
    client = MlflowClient(uri)
    sft_loss = [m.value for m in client.get_metric_history(sft_run, "loss")]
    kl = sorted(client.get_metric_history(grpo_run, "kl"), key=lambda m: m.step)
    assert len(sft_loss) == 2 and all(math.isfinite(v) for v in sft_loss)
    assert len(kl) == 2 and kl[0].value == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert math.isfinite(kl[1].value) and kl[1].value > 0  # after one update at lr 1e-2 it has moved
    # progress, from rank 0 into the stage's directory and MLflow (r1v.workflow.progress)
    from r1v.workflow import progress

    for stage, run_id, key in (("sft", sft_run, "loss"), ("grpo", grpo_run, "reward")):
        got = progress.read(tmp_path / stage)
        assert (got["step"], got["total"]) == (2, 2) and key in got["metrics"], got
        assert [m.step for m in client.get_metric_history(run_id, f"progress/{key}")][-1] == 2
    # GRPO's samples as an MLflow table, each row with an image cell (a thumbnail or the placeholder)
    tables = [a.path for a in client.list_artifacts(grpo_run, "samples")]
    assert "samples/step-00001.json" in tables and "samples/step-00001.jsonl" in tables, tables
    table = json.loads(Path(client.download_artifacts(grpo_run, "samples/step-00001.json", str(tmp_path))).read_text())
    image = table["columns"].index("image")
    assert table["data"] and all(row[image]["type"] == "image" for row in table["data"])
    model, _ = load_model(tmp_path / "grpo" / "model")
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters())
