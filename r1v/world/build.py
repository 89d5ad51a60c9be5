"""`r1v world build`: the miniature world's backbones, the analogue of the released checkpoints R1V starts from.

Seeded and reproducible: a tokenizer, a base causal LM pretrained on the domain's text, two children
fine-tuned from it (instruct: answers directly; reasoning: thinks first), and an InternVL vision tower
pretrained to read the domain's images. Weights are rounded to bfloat16 (a few MB to ship), then the text
accuracies of both children are measured on held-out problems *with the shipped weights* and written, with
the build config and a checksum of every file, to `world.json`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import torch

from r1v.core.fs import atomic_directory
from r1v.model.assemble import assemble
from r1v.model.config import TinySpec
from r1v.model.io import load_llm, save_llm
from r1v.model.tiny import DOWNSAMPLE_RATIO, tiny_vision_config
from r1v.model.tokenizer import build_tiny_tokenizer
from r1v.world import lm, text
from r1v.world.domain import CELL_TOKENS
from r1v.world.lm import say
from r1v.world.render import TILE
from r1v.world.vision import pretrain_tower

WORLD_DIR = Path(__file__).parent / "backbones"
"""The shipped build (made by `r1v world build --out r1v/world/backbones`)."""


class WorldBuildConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    seed: int = 0
    vocab_size: int = 400
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 512
    base_steps: int = 2400
    base_batch: int = 48
    base_lr: float = 3e-3
    child_steps: int = 1200
    child_batch: int = 48
    child_lr: float = 1e-3
    freeze_child_embeddings: bool = pydantic.Field(
        True, description="children keep the base's input embeddings (a light fine-tune, as R1-Distill and "
                          "the instruct model both inherit their base's embedding space)")
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_steps: int = 5000
    vision_batch: int = 32
    vision_lr: float = 3e-3
    eval_items: int = 1000
    threads: int = 1


def _bf16_round(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def file_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


def build_world(out: str | Path, c: WorldBuildConfig, progress: Callable[[str], None] = say,
                llms_from: str | Path | None = None) -> dict[str, Any]:
    """Build every backbone into `out`; with `llms_from` (a built world), reuse its tokenizer and LLMs (and their
    text figures) and build only the vision tower."""
    torch.set_num_threads(c.threads)
    t0 = time.time()
    if llms_from is not None:
        children, tok, text_acc, curves = _reuse_llms(Path(llms_from), progress)
    else:
        children, tok, text_acc, curves = _build_llms(c, progress)
    tower, vision = _build_tower(c, children["instruct"], tok, progress)

    out = Path(out)
    with atomic_directory(out) as tmp:
        # bfloat16 files (the weights were rounded to it): half the bytes; loading upcasts them exactly
        save_llm(children["instruct"].to(torch.bfloat16), tok, tmp / "instruct_llm")
        save_llm(children["reasoning"].to(torch.bfloat16), tok, tmp / "reasoning_llm")
        tower.to(torch.bfloat16).save_pretrained(tmp / "vision_tower")
        manifest = {
            "build_config": c.model_dump(), "seconds": round(time.time() - t0, 1),
            "llms_from": str(llms_from) if llms_from else None,  # a build of the same config made the LLMs
            "text_accuracy": text_acc, "vision": vision,
            "final_loss": {k: sum(v[-20:]) / len(v[-20:]) for k, v in curves.items()},
            "files": file_checksums(tmp),
        }
        (tmp / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"[world] written to {out} in {time.time() - t0:.0f}s")
    return manifest


def _reuse_llms(root: Path, progress: Callable[[str], None]):
    manifest = verify_world(root)
    children, tok = {}, None
    for name in ("instruct", "reasoning"):
        children[name], tok = load_llm(root / f"{name}_llm")
    progress(f"[world] reusing the tokenizer and LLMs of {root}")
    return children, tok, manifest["text_accuracy"], {k: [v] for k, v in manifest["final_loss"].items()
                                                      if k != "vision"}


def _build_llms(c: WorldBuildConfig, progress: Callable[[str], None]):
    """Tokenizer, base LM, and the instruct and reasoning children (bf16-rounded), with their text accuracy."""
    tok = build_tiny_tokenizer(text.tokenizer_texts(c.seed), vocab_size=c.vocab_size, split_digits=True,
                               extra_tokens=CELL_TOKENS)
    pad = tok.pad_token_id
    base = lm.build_lm(tok, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.seed)
    progress(f"[world] base LM: {sum(p.numel() for p in base.parameters()):,} parameters, vocabulary {len(tok)}")
    curves = {"base": lm.train_lm(base, lambda rng: lm.document_example(tok, text.base_document(rng)),
                                  steps=c.base_steps, batch=c.base_batch, lr=c.base_lr, seed=c.seed, pad_id=pad,
                                  desc="base LM pretraining", progress=progress)}
    children = {}
    for name, chat in (("instruct", text.instruct_chat), ("reasoning", text.reasoning_chat)):
        child = copy.deepcopy(base)
        curves[name] = lm.train_lm(child, lambda rng, chat=chat: lm.chat_example(tok, chat(rng)),
                                   steps=c.child_steps, batch=c.child_batch, lr=c.child_lr, seed=c.seed + 1,
                                   pad_id=pad, desc=f"{name} child", freeze_embeddings=c.freeze_child_embeddings,
                                   progress=progress)
        _bf16_round(child)
        children[name] = child.eval()
    problems = text.text_test_problems(c.eval_items, seed=12345)
    text_acc = {name: lm.greedy_text_accuracy(m, tok, problems) for name, m in children.items()}
    for name, r in text_acc.items():
        progress(f"[world] {name} LLM, text-only held-out problems: accuracy {r['accuracy']:.3f} "
                 f"(by level {r['by_level']})")

    return children, tok, text_acc, curves


def _build_tower(c: WorldBuildConfig, llm, tok, progress: Callable[[str], None]):
    """transformers' InternVL vision tower, pretrained on the world's images through r1v's own feature path."""
    from transformers import InternVLConfig, InternVLVisionModel
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector


    spec = TinySpec(hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
                    num_kv_heads=c.num_kv_heads, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                    vision_hidden_size=c.vision_hidden_size, vision_layers=c.vision_layers,
                    vision_heads=c.vision_heads, tile_size=TILE, patch_size=14, seed=c.seed)
    vcfg = tiny_vision_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        tower = InternVLVisionModel(vcfg)
        projector = InternVLMultiModalProjector(InternVLConfig(vision_config=vcfg, text_config=llm.config,
                                                               downsample_ratio=DOWNSAMPLE_RATIO))
    vlm = assemble(tower, projector, llm, tok, vision_config=vcfg, downsample_ratio=DOWNSAMPLE_RATIO)
    vision = pretrain_tower(vlm, steps=c.vision_steps, batch=c.vision_batch, lr=c.vision_lr, seed=c.seed,
                            progress=progress)
    _bf16_round(tower)
    progress(f"[world] vision tower: held-out digit accuracy {vision['digit_accuracy_test']:.3f}")
    return tower, vision


def verify_world(root: str | Path = WORLD_DIR) -> dict[str, Any]:
    """The manifest of a built world, after checking every file against its checksum."""
    root = Path(root)
    path = root / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no built world (no world.json): run `r1v world build --out {root}`")
    manifest = json.loads(path.read_text())
    got = file_checksums(root)
    bad = sorted(k for k, v in manifest["files"].items() if got.get(k) != v)
    if bad:
        raise ValueError(f"world files at {root} do not match their checksums: {bad}; rebuild with "
                         f"`r1v world build --out {root}`")
    return manifest
