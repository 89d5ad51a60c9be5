"""The cost model of `r1v plan`: per-GPU memory and FLOPs of a stage from its architecture and config.

Memory per GPU, in bytes. N = trainer.num_workers (data-parallel ranks, one GPU each), d = bytes of trainer.dtype
(2 for bf16/fp16, 4 for fp32), P all parameters, T the trainable ones, Lmax the parameters of the largest module.

Model states follow DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`,
`estimate_zero2_model_states_mem_needs`, no offload), extended to frozen parameters, which have neither gradients
nor optimizer states:
  weights     ZeRO-3: d*P/N + 4*Lmax (DeepSpeed's buffer for gathering the largest layer); ZeRO-0..2: d*P
  gradients   16-bit: ZeRO-3 4*T/N; ZeRO-2 6*T/N (16-bit and fp32 partitions); ZeRO-1 2*T + 4*T/N; ZeRO-0 6*T;
              fp32: 4*T/N at ZeRO-2/3, else 4*T
  optimizer   AdamW: 16-bit 12*T (fp32 master weights, m, v), fp32 8*T (m, v); divided by N at ZeRO >= 1
  With every parameter trainable at 16 bits this is ZeRO-3 18*P/N + 4*Lmax and ZeRO-2 2*P + 18*P/N: DeepSpeed's
  figures, which tests/test_plan.py compares.
Activations of one micro-batch of b sequences of s tokens (SFT: batch_size x max_length, or x max_tokens when
packing; GRPO: its micro_batch (default: prompts_per_step*group_size) x (prompt max_length + max_new_tokens)):
  LLM         b*s*(L*a + f): a = LLMArch.act_bytes_per_token_layer, what autograd keeps per token in a *frozen*
              Qwen2 layer under SDPA (about 45*h bytes at 32B: SwiGLU's three i-wide tensors dominate), f the final
              norm and RoPE tables. With activation checkpointing b*s*(L*d*h + f) + b*s*a: each layer's input is
              kept and one layer at a time is recomputed in backward.
  logits      12*b*s*V: the fp32 log-softmax kept for backward, its gradient and the gradient flowing in.
  projector   its inputs and outputs for the image tokens: d*(2*in + 3*h) each.
  vision      frozen, so it keeps nothing for backward: its one-layer working set, d*(i + 4h) per vision token, is a
              separate, earlier peak: activations = max(vision, LLM + logits + projector). A trainable tower keeps
              Korthikanti et al.'s 34*h per token per layer (at 16 bits) on top.
Per GPU total = weights + gradients + optimizer + activations + plan.reserve_gb (CUDA context, NCCL, allocator).

Rollout and eval engines: `transformers` holds the whole model in float32 on one device (r1v.model.io.load_model's
default) and a float32 KV cache for every sequence of one generate call, plus their fp32 scores when log-probs are
kept (GRPO); `vllm` shards bf16 weights over engine.num_gpus (tensor parallel) and needs at least one full
sequence's KV cache (it schedules as many as fit).

FLOPs: 2 per GEMM parameter per token plus causal attention (LLMArch.forward_flops_per_token); a frozen part
backpropagates activation gradients only (1x its forward), a trainable one 2x; checkpointing adds one forward.
"""

from __future__ import annotations

from typing import Any

from r1v.plan.arch import Arch, LLMArch, VLMArch

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGITS_TRAIN_BYTES = 12  # per token per vocabulary entry (see the module docstring)


def model_states(total: int, trainable: int, largest: int, n: int, zero: int, dtype: str) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per GPU under ZeRO stage `zero` over `n` ranks."""
    d = DTYPE_BYTES[dtype]
    weights = d * total / n + 4 * largest if zero == 3 else d * total
    if d == 4:
        grads = 4 * trainable / n if zero >= 2 else 4 * trainable
        optim = 8 * trainable
    else:
        grads = {3: 4 * trainable / n, 2: 6 * trainable / n, 1: 2 * trainable + 4 * trainable / n}.get(
            zero, 6 * trainable
        )
        optim = 12 * trainable
    return float(weights), float(grads), float(optim / n if zero >= 1 else optim)


def llm_activations(llm: LLMArch, tokens: int, d: int, trainable: bool, checkpointing: bool) -> float:
    """Bytes the LLM keeps for backward over `tokens` tokens (plus, with checkpointing, one recomputed layer)."""
    a = llm.act_bytes_per_token_layer(d, trainable)
    f = llm.act_bytes_per_token_fixed(d)
    if checkpointing:
        return float(tokens * (llm.layers * d * llm.hidden + f) + tokens * a)
    return float(tokens * (llm.layers * a + f))


def vision_working_set(arch: VLMArch, tiles: int, d: int) -> float:
    """The frozen tower's peak while it runs: one layer's tensors for every vision token."""
    v = arch.vision
    return float(tiles * v.tokens_per_tile() * d * (v.intermediate + 4 * v.hidden))


def train_activations(arch: VLMArch, b: int, s: int, tiles: int, d: int, trainable: list[str], ckpt: bool) -> float:
    """Peak activation bytes of one training micro-batch: b sequences of s tokens holding `tiles` image tiles."""
    llm, v = arch.llm, arch.vision
    tokens = b * s
    act = llm_activations(llm, tokens, d, "llm" in trainable, ckpt) + LOGITS_TRAIN_BYTES * tokens * llm.vocab
    if "projector" in trainable or "vision" in trainable:
        act += min(tiles * arch.tokens_per_tile(), tokens) * d * (2 * arch.projector_in + 3 * llm.hidden)
    if "vision" in trainable:
        return act + tiles * v.tokens_per_tile() * v.layers * 17 * d * v.hidden
    return max(act, vision_working_set(arch, tiles, d))


def train_flops(
    arch: VLMArch, b: int, s: int, tiles: int, trainable: list[str], ckpt: bool, vision: bool = True
) -> float:
    """FLOPs of one micro-batch: forward, backward (activation gradients; weight gradients where trainable) and,
    with checkpointing, the LLM's recomputed forward. `vision=False`: the tower's features come precomputed."""
    fwd = b * s * arch.llm.forward_flops_per_token(s)
    llm = fwd * (3 if "llm" in trainable else 2) + (fwd if ckpt else 0)
    runs_tower = vision or "vision" in trainable
    vision_f = tiles * arch.vision.forward_flops_per_tile() * (3 if "vision" in trainable else 1) * runs_tower
    proj = 6.0 * arch.groups()["projector"] * min(tiles * arch.tokens_per_tile(), b * s)
    return llm + vision_f + proj


def generate_flops(arch: Arch, sequences: int, s: int, tiles: int) -> float:
    """Generating `sequences` sequences of s tokens (prompt + completion), with their images' vision pass."""
    llm = arch.llm if isinstance(arch, VLMArch) else arch
    flops = sequences * s * llm.forward_flops_per_token(s)
    if isinstance(arch, VLMArch):
        flops += sequences * tiles * arch.vision.forward_flops_per_tile()
    return flops


def engine_memory(
    arch: Arch, kind: str, num_gpus: float, seqs: int, s: int, new: int, logprobs: bool
) -> tuple[float, float, int]:
    """(weights, KV cache and scores) bytes per GPU of one engine, and the GPUs it spans (module docstring)."""
    llm = arch.llm if isinstance(arch, VLMArch) else arch
    if kind == "vllm":
        tp = max(1, int(num_gpus))
        return 2.0 * arch.params() / tp, float(llm.kv_bytes_per_token(2) * s / tp), tp
    kv = seqs * s * llm.kv_bytes_per_token(4)
    return 4.0 * arch.params(), float(kv + (seqs * new * llm.vocab * 4 if logprobs else 0)), 1


def sample_tiles(pre: Any) -> int:
    """Tiles of one sample at most: max_tiles, plus the thumbnail when there is more than one tile."""
    return pre.max_tiles + (1 if pre.use_thumbnail and pre.max_tiles > 1 else 0)
