"""`bench/gpu_step.py` at tiny size on the CPU: the product's SFT step and GRPO update run in one plain process
under a real DeepSpeed ZeRO-3 engine in bf16, with the KL term, and Ray is never imported."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_step_bench_runs_at_tiny_size_without_ray(tmp_path):
    out = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--size", "tiny", "--device", "cpu",
                           "--dtype", "bfloat16", "--steps", "2", "--kl-coef", "0.1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["ray_imported"] is False
    assert fig["engine_dtype"] == "torch.bfloat16" and fig["zero_stage"] == 3
    assert fig["tokens_per_s"] > 0 and math.isfinite(fig["sft_loss"]) and fig["sft_loss"] > 0
    assert math.isfinite(fig["grpo_loss"]) and fig["grpo_samples"] == 32
    assert "tokens_per_s:" in proc.stdout
