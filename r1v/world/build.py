"""`r1v world build`: the miniature world's backbones, the analogue of the released checkpoints R1V starts from.

Seeded and reproducible: a tokenizer, a base causal LM pretrained on the domain's text, two children
fine-tuned from it (instruct: answers directly; reasoning: thinks first), and an InternVL vision tower
pretrained to read the domain's images. Weights are rounded to bfloat16 (a few MB to ship), then the text
accuracies of both children are measured on held-out problems *with the shipped weights* and written, with
the build config, the reasoning child's chain lengths and checks (`chains`) and a checksum of every file, to
`world.json`. The base LM ships too (`base_llm/`), so that `rebuild_reasoning` (`r1v world build --only
reasoning --from WORLD`) can fine-tune another reasoning child from it and reuse everything else.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import torch
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from r1v.core.fs import atomic_directory
from r1v.model.assemble import assemble
from r1v.model.config import TinySpec
from r1v.model.io import load_llm, save_llm
from r1v.model.tiny import DOWNSAMPLE_RATIO, tiny_vision_config
from r1v.model.tokenizer import build_tiny_tokenizer
from r1v.world import lm, text
from r1v.world.config import OverthinkConfig
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
    freeze_child_layers: int = pydantic.Field(
        0, ge=0, description="children keep the base's first k decoder layers as well (closer to their base)")
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_steps: int = 5000
    vision_batch: int = 32
    vision_lr: float = 3e-3
    eval_items: int = 1000
    threads: int = 1
    overthink: OverthinkConfig | None = pydantic.Field(
        None, description="the reasoning child's chats carry redundant checks (default: none)")

    @pydantic.model_validator(mode="after")
    def _layers_exist(self) -> WorldBuildConfig:
        if self.freeze_child_layers > self.num_layers:
            raise ValueError(f"freeze_child_layers {self.freeze_child_layers} > num_layers {self.num_layers}")
        return self

    @pydantic.model_serializer(mode="wrap")
    def _omit_defaults_of_new_options(self, handler: pydantic.SerializerFunctionWrapHandler) -> dict[str, Any]:
        """At their defaults the options added after the shipped build stay out of the dump, so a default
        config's `build_config` in world.json is what it was before them."""
        out = handler(self)
        if out.get("freeze_child_layers") == 0:
            out.pop("freeze_child_layers", None)
        if out.get("overthink") is None:
            out.pop("overthink", None)
        return out

    def eval_tokens(self) -> int:
        """The reasoning child's greedy budget in the text evaluation: `EVAL_TOKENS`, plus room for the checks an
        overthinking child was taught (a check restates at most 26 tokens; the closing adds 4)."""
        return EVAL_TOKENS if self.overthink is None else EVAL_TOKENS + 32 * self.overthink.max_checks


EVAL_TOKENS = 64
"""Greedy budget of the text evaluation, as the shipped figures were measured (the longest plain reasoning answer
is 66 tokens: 3 of the 1,000 held-out ones are cut); the instruct child's always, its answers are direct."""


REASONING_ONLY_INHERITED = ("seed", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                            "intermediate_size", "base_steps", "base_batch", "base_lr", "vision_hidden_size",
                            "vision_layers", "vision_heads", "vision_steps", "vision_batch", "vision_lr")
"""What a reasoning-only rebuild takes from its source world (the tokenizer, the base, the tower follow from
these): an override of one of them is refused rather than recorded for parts it did not make."""


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
        base, children, tok, figures, curves = _reuse_llms(Path(llms_from), progress)
    else:
        base, children, tok, figures, curves = _build_llms(c, progress)
    tower, vision = _build_tower(c, children["instruct"], tok, progress)

    out = Path(out)
    with atomic_directory(out) as tmp:
        # bfloat16 files (the weights were rounded to it): half the bytes; loading upcasts them exactly
        if base is not None:
            save_llm(base.to(torch.bfloat16), tok, tmp / "base_llm")
        save_llm(children["instruct"].to(torch.bfloat16), tok, tmp / "instruct_llm")
        save_llm(children["reasoning"].to(torch.bfloat16), tok, tmp / "reasoning_llm")
        tower.to(torch.bfloat16).save_pretrained(tmp / "vision_tower")
        manifest = _write_manifest(tmp, {
            "build_config": c.model_dump(), "seconds": round(time.time() - t0, 1),
            "llms_from": str(llms_from) if llms_from else None,  # a build of the same config made the LLMs
            **figures, "vision": vision,
            "final_loss": {k: sum(v[-20:]) / len(v[-20:]) for k, v in curves.items()}})
    progress(f"[world] written to {out} in {time.time() - t0:.0f}s")
    return manifest


def rebuild_reasoning(out: str | Path, source: str | Path, c: WorldBuildConfig,
                      progress: Callable[[str], None] = say) -> dict[str, Any]:
    """A world like `source` with only the reasoning child rebuilt: fine-tuned from `source`'s shipped base with
    `c`'s child settings and overthink option. The tokenizer, base, instruct child and vision tower are copied
    byte for byte; both children's text figures are measured again; `reused` in world.json says from where.

    The new child starts from the bf16-rounded base (a full build fine-tunes from the unrounded one), so even
    with the source's own settings it is not bit-identical to the source's child."""
    torch.set_num_threads(c.threads)
    t0 = time.time()
    source = Path(source)
    src = reasoning_source(source, c)
    base, tok = load_llm(source / "base_llm")
    instruct, _ = load_llm(source / "instruct_llm")
    progress(f"[world] reasoning child from the base of {source}; reusing its tokenizer, base, instruct child "
             f"and vision tower")
    reasoning, curve = _train_child(base, tok, "reasoning", text.reasoning_chat, c, progress)
    figures = _measure({"instruct": instruct, "reasoning": reasoning}, tok, c, progress)

    out = Path(out)
    with atomic_directory(out) as tmp:
        for part in ("base_llm", "instruct_llm", "vision_tower"):
            shutil.copytree(source / part, tmp / part)
        save_llm(reasoning.to(torch.bfloat16), tok, tmp / "reasoning_llm")
        _copy_tokenizer_files(source / "base_llm", tmp / "reasoning_llm")
        manifest = _write_manifest(tmp, {
            "build_config": c.model_dump(), "seconds": round(time.time() - t0, 1), "llms_from": None,
            "reused": {"from": str(source), "parts": ["tokenizer", "base_llm", "instruct_llm", "vision_tower"],
                       "build_config": src["build_config"]},  # the settings the reused parts were made with
            **figures, "vision": src["vision"],
            "final_loss": {**{k: v for k, v in src["final_loss"].items() if k != "reasoning"},
                           "reasoning": sum(curve[-20:]) / len(curve[-20:])}})
    progress(f"[world] written to {out} in {time.time() - t0:.0f}s")
    return manifest


def reasoning_source(source: str | Path, c: WorldBuildConfig) -> dict[str, Any]:
    """The manifest of `source` once it is known to serve a reasoning-only rebuild with `c`: its checksums hold,
    it ships a base LM, and `c` keeps what the reused parts were made with; else ValueError saying why."""
    src = verify_world(source)
    if "base_llm/model.safetensors" not in src["files"]:
        raise ValueError(f"{source} ships no base LM (base_llm/), which a reasoning-only rebuild fine-tunes "
                         f"from: make a full build first (`r1v world build --out DIR`), then rebuild from it")
    changed = [k for k in REASONING_ONLY_INHERITED if getattr(c, k) != src["build_config"].get(k)]
    if changed:
        raise ValueError(f"a reasoning-only rebuild reuses {source}'s tokenizer, base and tower: "
                         f"{', '.join(changed)} must stay as they were built")
    return src


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    """`src`'s tokenizer files in place of `dst`'s: a loaded tokenizer saves other bytes than the built one did
    (transformers loads it as Qwen2Tokenizer and writes its own pre-tokenizer, same ids on the world's texts),
    and a reused tokenizer should be the same file."""
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {**manifest, "files": file_checksums(root)}
    (root / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _reuse_llms(root: Path, progress: Callable[[str], None]):
    manifest = verify_world(root)
    children, tok = {}, None
    for name in ("instruct", "reasoning"):
        children[name], tok = load_llm(root / f"{name}_llm")
    base = load_llm(root / "base_llm")[0] if (root / "base_llm").is_dir() else None  # worlds before it shipped
    progress(f"[world] reusing the tokenizer and LLMs of {root}")
    figures = {k: manifest[k] for k in ("text_accuracy", "chains") if k in manifest}
    return base, children, tok, figures, {k: [v] for k, v in manifest["final_loss"].items() if k != "vision"}


def _train_child(base: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, name: str, chat: Callable[..., Any],
                 c: WorldBuildConfig, progress: Callable[[str], None]) -> tuple[Qwen2ForCausalLM, list[float]]:
    """A child fine-tuned from (a copy of) `base` on `chat`'s chats, bf16-rounded, in eval mode."""
    if name == "reasoning" and c.overthink is not None:
        chat = functools.partial(chat, overthink=c.overthink)
    child = copy.deepcopy(base)
    curve = lm.train_lm(child, lambda rng: lm.chat_example(tok, chat(rng)), steps=c.child_steps,
                        batch=c.child_batch, lr=c.child_lr, seed=c.seed + 1, pad_id=tok.pad_token_id,
                        desc=f"{name} child", freeze_embeddings=c.freeze_child_embeddings,
                        freeze_layers=c.freeze_child_layers, progress=progress)
    _bf16_round(child)
    return child.eval(), curve


def _measure(children: dict[str, Qwen2ForCausalLM], tok: PreTrainedTokenizerBase, c: WorldBuildConfig,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Both children's greedy text accuracy on held-out problems, and the reasoning child's chains by level."""
    problems = text.text_test_problems(c.eval_items, seed=12345)
    text_acc, chains = {}, {}
    for name, m in children.items():
        budget = c.eval_tokens() if name == "reasoning" else EVAL_TOKENS  # instruct's comparable with any world's
        done = lm.greedy_completions(m, tok, problems, max_new_tokens=budget)
        text_acc[name] = lm.text_accuracy(problems, [t for t, _ in done])
        r = text_acc[name]
        progress(f"[world] {name} LLM, text-only held-out problems: accuracy {r['accuracy']:.3f} "
                 f"(by level {r['by_level']})")
        if name == "reasoning":
            chains = {"max_new_tokens": c.eval_tokens(), "by_level": lm.chain_stats(problems, done)}
            progress(f"[world] reasoning LLM chains by level: {chains['by_level']}")
    return {"text_accuracy": text_acc, "chains": chains}


def _build_llms(c: WorldBuildConfig, progress: Callable[[str], None]):
    """Tokenizer, base LM, and the instruct and reasoning children (bf16-rounded), with their text figures."""
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
        children[name], curves[name] = _train_child(base, tok, name, chat, c, progress)
    # the children were fine-tuned from the unrounded base (as before it shipped); the shipped base is rounded
    _bf16_round(base)
    return base.eval(), children, tok, _measure(children, tok, c, progress), curves


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
