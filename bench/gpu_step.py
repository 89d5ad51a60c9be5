"""Projector-only SFT steps and one GRPO update of a random-init VLM in the real shapes, without Ray.

    python bench/gpu_step.py                       # GPU: InternViT-300M-shaped tower + Qwen2-1.5B-shaped LLM, bf16
    python bench/gpu_step.py --size tiny --device cpu --steps 2 --kl-coef 0.1      # CPU smoke run (a test runs it)

It calls the same functions the Ray Train workers call (`r1v.train.sft.sft_step`, `r1v.rl.update.grpo_update`)
under a real DeepSpeed engine (ZeRO stage `--zero-stage`, world size 1, a process group it starts itself), so a
GPU machine that cannot install Ray still times the product's own step.

Figures: tokens/s (LLM tokens, image tokens included), peak GPU memory, and MFU, with
    FLOPs per SFT step = 4 * N_llm * T_llm  +  2 * N_vit * P_vit  +  6 * N_proj * T_img
where T_llm are the LLM tokens of the step (forward 2N, backward through the frozen LLM to its inputs 2N; no
weight gradients), P_vit the vision patches (a forward only: the tower is frozen), T_img the image tokens
(the projector trains: forward + both backward products). Attention's quadratic term is left out (it is < 5% at
these lengths), so MFU is slightly under-counted. Peak: --peak-tflops (default 989, an H200's dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # InternViT-300M-448px and Qwen2-1.5B shapes (vocabulary cut to 32K: the lm_head is not what is timed).
    "1b": {"vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          image_size=448, patch_size=14),
           "llm": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=32768)},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: str) -> None:
    """World size 1, no launcher: what `torchrun --nproc_per_node 1` would set up."""
    from r1v.train.engine import prepare_deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    deepspeed = prepare_deepspeed()  # on CPU: no shared-memory allreduce op (compiling it costs 30 to 80 s)
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)


def build_model(size: str, dtype: torch.dtype, device: str, attn: str):
    """A random-init VLM with r1v's tokenizer conventions, and its tokenizer."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    from r1v.model.tiny import DOWNSAMPLE_RATIO, TinySpec, build_tiny_vlm
    from r1v.model.tokenizer import build_tiny_tokenizer

    if size == "tiny":
        model, tok = build_tiny_vlm(TinySpec())
        return model.to(device=device, dtype=dtype), tok
    tok = build_tiny_tokenizer()
    shapes = SIZES[size]
    vcfg = InternVLVisionConfig(**shapes["vision"], use_qk_norm=False, use_mean_pooling=False)
    tcfg = Qwen2Config(**shapes["llm"], tie_word_embeddings=False, max_position_embeddings=32768)
    cfg = InternVLConfig(vision_config=vcfg, text_config=tcfg, downsample_ratio=DOWNSAMPLE_RATIO,
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    cfg._attn_implementation = attn
    with torch.device(device):  # built in `dtype` directly: no fp32 transient of the whole model
        model = InternVLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model, tok


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sft_batch(model, micro_batch: int, seq_len: int, tiles: int, rng: np.random.Generator) -> dict[str, Any]:
    """Rows of `tiles` images' context tokens then text up to `seq_len`, labels on the text (what collate_sft gives)."""
    from r1v.data.collate import IGNORE
    from r1v.model.assemble import num_image_tokens, tile_size

    t, per_tile = tile_size(model.config), num_image_tokens(model.config)
    n_img = tiles * per_tile
    if seq_len <= n_img + 8:
        raise SystemExit(f"--seq-len {seq_len} leaves no text after {n_img} image tokens")
    vocab = model.config.text_config.vocab_size
    ids = torch.from_numpy(rng.integers(0, min(vocab, 400), (micro_batch, seq_len)))
    ids[:, :n_img] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :n_img] = IGNORE
    pixels = torch.from_numpy(rng.integers(0, 255, (micro_batch * tiles, 3, t, t), dtype=np.uint8))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels,
            "n_img": n_img}


def rollout_batch(model, prompts: int, group: int, prompt_len: int, new_tokens: int, tiles: int,
                  rng: np.random.Generator):
    """A RolloutBatch of random completions, half of them ending in the right boxed answer (non-zero rewards)."""
    from r1v.generation.engines import Completion
    from r1v.model.assemble import num_image_tokens, tile_size
    from r1v.rl.update import RolloutBatch

    t, per_tile = tile_size(model.config), num_image_tokens(model.config)
    rows, comps = [], []
    for i in range(prompts):
        ids = [model.config.image_token_id] * (tiles * per_tile) + rng.integers(0, 400, prompt_len).tolist()
        px = rng.integers(0, 255, (tiles, 3, t, t), dtype=np.uint8).tobytes()
        rows.append({"id": f"p{i}", "input_ids": ids, "pixel_values": px, "n_tiles": tiles, "answer": "7"})
        comps.append([Completion(token_ids=rng.integers(0, 400, new_tokens).tolist(), logprobs=[],
                                 text="x </think> \\boxed{7}" if j % 2 else "x </think> \\boxed{3}", finished=True)
                      for j in range(group)])
    return RolloutBatch(rows, comps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", *SIZES], default="1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=3)
    ap.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the LLM")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed SFT steps (after 2 warm-up steps)")
    ap.add_argument("--grpo-prompts", type=int, default=4)
    ap.add_argument("--grpo-group", type=int, default=8)
    ap.add_argument("--grpo-new-tokens", type=int, default=1024)
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    if a.size == "tiny":  # tiny tiles are 56 px: 4 image tokens each
        a.seq_len, a.micro_batch, a.grpo_new_tokens = min(a.seq_len, 64), min(a.micro_batch, 2), 16

    from r1v.core.config import OptimConfig, TrainerConfig
    from r1v.model.freeze import apply_freeze
    from r1v.rl.config import GRPOConfig
    from r1v.rl.update import grpo_update, reference_projector
    from r1v.train.device import engine_device, engine_dtype
    from r1v.train.engine import init_engine
    from r1v.train.sft import sft_step

    dtype = getattr(torch, a.dtype)
    init_process_group(a.device)
    if a.device == "cuda":
        torch.cuda.set_device(0)
    torch.manual_seed(0)
    model, tok = build_model(a.size, dtype, a.device, a.attn)
    n_vit, n_proj = numel(model.model.vision_tower), numel(model.model.multi_modal_projector)
    n_llm = numel(model.model.language_model)  # the transformer; the lm_head is counted apart
    n_head = numel(model.lm_head)
    apply_freeze(model, ["projector"])
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = TrainerConfig(num_workers=1, use_gpu=a.device == "cuda", zero_stage=a.zero_stage, dtype=a.dtype)
    optim = OptimConfig(lr=1e-4, warmup_ratio=0.0)
    engine = init_engine(model, trainer, optim, a.steps + 3, a.micro_batch)
    rng = np.random.default_rng(0)
    batch = sft_batch(engine.module, a.micro_batch, a.seq_len, a.tiles, rng)
    n_img = batch.pop("n_img")

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: allocator, kernels, ZeRO-3 partition bookkeeping
        sft_step(engine, [batch], packing=False, world=1)
    sync()
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        nll, tokens, _ = sft_step(engine, [batch], packing=False, world=1)
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    tok_step = a.micro_batch * a.seq_len
    patches = a.micro_batch * a.tiles * ((engine.module.config.vision_config.image_size[0]
                                          // engine.module.config.vision_config.patch_size[0]) ** 2 + 1)
    flops = 4 * (n_llm + n_head) * tok_step + 2 * n_vit * patches + 6 * n_proj * a.micro_batch * n_img
    out: dict[str, Any] = {
        "size": a.size, "device": a.device, "dtype": a.dtype, "zero_stage": a.zero_stage, "attn": a.attn,
        "checkpointing": a.checkpointing, "params": {"vision": n_vit, "projector": n_proj, "llm": n_llm + n_head},
        "micro_batch": a.micro_batch, "seq_len": a.seq_len, "tiles": a.tiles,
        "sft_step_s": dt, "tokens_per_s": tok_step / dt, "tflops": flops / dt / 1e12,
        "mfu": flops / dt / (a.peak_tflops * 1e12) if a.device == "cuda" else None,
        "sft_loss": nll / max(tokens, 1),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None,
        "engine_device": str(engine_device(engine)), "engine_dtype": str(engine_dtype(engine)),
    }
    cfg = GRPOConfig(model="unused", corpus="unused", kl_coef=a.kl_coef, group_size=a.grpo_group,
                     rewards={"accuracy": 1.0}, sampling={"temperature": 1.0})
    ref = reference_projector(engine.module, engine_device(engine), engine_dtype(engine)) if a.kl_coef else None
    rb = rollout_batch(engine.module, a.grpo_prompts, a.grpo_group, 64, a.grpo_new_tokens, a.tiles, rng)
    sync()
    t0 = time.perf_counter()
    res = grpo_update(engine, rb, cfg, tok.pad_token_id, engine.module.config.vision_config.image_size[0], 1, ref)
    sync()
    out.update(grpo_update_s=time.perf_counter() - t0, grpo_loss=res["loss"], grpo_kl=res["kl"],
               grpo_samples=len(rb.flat), ray_imported="ray" in sys.modules)
    if a.device == "cuda":
        out["peak_gpu_gib_with_grpo"] = torch.cuda.max_memory_allocated() / 2**30
    for k, v in out.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
