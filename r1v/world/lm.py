"""Training the miniature world's language models in one process: the base LM and its two children.

Plain torch, no Ray: these are the "released checkpoints" the recipe starts from, built once by
`r1v world build` and shipped; the recipe itself (align, SFT, GRPO) runs on Ray like any real run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from r1v.data.prompt import IGNORE_INDEX, encode_prompt, encode_sft
from r1v.grading.rewards import accuracy
from r1v.model.config import TinySpec
from r1v.model.tiny import build_tiny_llm
from r1v.model.tokens import PAD
from r1v.world.domain import CHECK, THINK_END, Problem, text_question


def say(text: str) -> None:
    """Progress lines reach a log file as they happen, not when its buffer fills."""
    print(text, flush=True)


def build_lm(tok: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int, kv_heads: int,
             intermediate: int, seed: int) -> Qwen2ForCausalLM:
    """A fresh Qwen2 of the world's size: r1v's tiny-model factory, with a 512-token context."""
    spec = TinySpec(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                    intermediate_size=intermediate, vocab_size=len(tok), max_position_embeddings=512, seed=seed)
    return build_tiny_llm(spec, tok)


def document_example(tok: PreTrainedTokenizerBase, text: str) -> dict[str, list[int]]:
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(PAD)]
    return {"input_ids": ids, "labels": list(ids)}


def chat_example(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    return encode_sft(messages, tok, [], 1, max_length=512)


def _collate(rows: list[dict[str, list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return ids, labels, mask


def train_lm(model: Qwen2ForCausalLM, examples: Callable[[random.Random], dict[str, list[int]]], *, steps: int,
             batch: int, lr: float, seed: int, pad_id: int, desc: str, warmup: int = 50,
             freeze_embeddings: bool = False, freeze_layers: int = 0,
             progress: Callable[[str], None] = say) -> list[float]:
    """AdamW with warm-up and cosine decay over freshly drawn examples; returns the loss curve. The input
    embeddings and the first `freeze_layers` decoder layers can be kept as they are."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    frozen = list(model.model.layers[:freeze_layers].parameters())
    model.get_input_embeddings().weight.requires_grad_(not freeze_embeddings)
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        ids, labels, mask = _collate([examples(rng) for _ in range(batch)], pad_id)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            recent = sum(losses[-20:]) / len(losses[-20:])
            progress(f"[world] {desc}: step {step + 1}/{steps}, loss {recent:.3f}, {time.time() - t0:.0f}s")
    model.get_input_embeddings().weight.requires_grad_(True)
    for p in frozen:
        p.requires_grad_(True)
    return losses


@torch.no_grad()
def greedy_completions(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, problems: list[Problem],
                       max_new_tokens: int = 64, batch: int = 256) -> list[tuple[str, int]]:
    """Greedy answers to text-only problems: (decoded text, chain tokens: generated up to and including
    `</think>`, or all generated tokens when it never comes)."""
    model.eval()
    pad = tok.convert_tokens_to_ids(PAD)
    think_end = tok.convert_tokens_to_ids(THINK_END)
    out_rows: list[tuple[str, int]] = []
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        prompts = [encode_prompt([{"role": "user", "content": text_question(p)}], tok, [], 1) for p in chunk]
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad)
        for seq in out[:, n:].tolist():
            stop = next((i for i, t in enumerate(seq) if t in (tok.eos_token_id, pad)), len(seq))
            gen = seq[:stop]
            chain = gen.index(think_end) + 1 if think_end in gen else len(gen)
            out_rows.append((tok.decode(seq, skip_special_tokens=True), chain))
    return out_rows


def text_accuracy(problems: list[Problem], texts: list[str]) -> dict[str, Any]:
    """Accuracy of answers to text-only problems, overall and by level."""
    correct = [bool(accuracy(t, {"answer": str(p.answer)})) for p, t in zip(problems, texts, strict=True)]
    by_level: dict[int, list[bool]] = {}
    for p, c in zip(problems, correct, strict=True):
        by_level.setdefault(p.level, []).append(c)
    return {"accuracy": sum(correct) / len(correct), "n": len(correct),
            "by_level": {str(lv): sum(v) / len(v) for lv, v in sorted(by_level.items())}}


def chain_stats(problems: list[Problem], completions: list[tuple[str, int]]) -> dict[str, dict[str, float]]:
    """Per level: mean chain tokens and the shares of chains with at least one and two `Check:` restatements
    (the overthinking habit, `domain.overthought_chain`)."""
    by_level: dict[int, list[tuple[int, int]]] = {}
    for p, (text, tokens) in zip(problems, completions, strict=True):
        by_level.setdefault(p.level, []).append((tokens, text.split(THINK_END)[0].count(CHECK)))
    return {str(lv): {"n": len(v), "mean_chain_tokens": sum(t for t, _ in v) / len(v),
                      "with_check": sum(c >= 1 for _, c in v) / len(v),
                      "with_two_checks": sum(c >= 2 for _, c in v) / len(v)}
            for lv, v in sorted(by_level.items())}


def greedy_text_accuracy(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, problems: list[Problem],
                         max_new_tokens: int = 64, batch: int = 256) -> dict[str, Any]:
    """Greedy accuracy on text-only problems, overall and by level (the ceiling a frozen LLM puts on VLMs)."""
    texts = [t for t, _ in greedy_completions(model, tok, problems, max_new_tokens, batch)]
    return text_accuracy(problems, texts)
