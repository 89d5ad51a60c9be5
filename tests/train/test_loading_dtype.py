"""Under ZeRO-3's `zero.Init` in bf16, RoPE's inverse frequencies must stay fp32-exact (`arange_keeps_dtype`)."""

from __future__ import annotations

import os
import socket

import pytest
import torch


@pytest.fixture
def process_group():
    import torch.distributed as dist

    from r1v.train.engine import prepare_deepspeed

    deepspeed = prepare_deepspeed()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield deepspeed
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_rope_frequencies_stay_fp32_under_bf16_zero_init(process_group):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from r1v.train.loading import arange_keeps_dtype

    cfg = Qwen2Config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256)
    want = Qwen2RotaryEmbedding(cfg).inv_freq
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with process_group.zero.Init(config_dict_or_path=ds_cfg, dtype=torch.bfloat16):
        cast = Qwen2RotaryEmbedding(cfg).inv_freq
    with arange_keeps_dtype(), process_group.zero.Init(config_dict_or_path=ds_cfg, dtype=torch.bfloat16):
        kept = Qwen2RotaryEmbedding(cfg).inv_freq
    assert kept.dtype == torch.float32 and torch.equal(kept, want)
    assert not torch.equal(cast.float(), want)  # without it, zero.Init rounds them to bf16
