"""Save and load models with their tokenizers, atomically, and never from a hub.

A checkpoint directory is either complete or absent: a crash while saving leaves the previous version in
place, which is what the workflow's resume logic relies on. A saved model records the sha256 of its weights
beside them (`r1v_checksums.json`), so that stage outputs built on it (`r1v.model.manifest`) never hash it again;
`load_model` also loads such a manifest directory (a projector plus the frozen parts it names).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from r1v.core.fs import atomic_directory
from r1v.core.storage import stage_local
from r1v.model.checksums import record_checksums
from r1v.model.convert import hf_view
from r1v.model.manifest import is_manifest_dir, load_manifest_model


def _require_dir(path: str | os.PathLike) -> Path:
    p = stage_local(path)  # staged on this node when it lies in an object store
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no saved model at {p}: {p / 'config.json'} does not exist")
    return p


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write `model` and `tokenizer` with `save_pretrained` into `path`, replacing it atomically."""


    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record_checksums(tmp)
    return Path(path).absolute()


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a VLM saved by `save_model` (local files only) in eval mode; an InternVL-chat / Skywork-R1V
    checkpoint is converted to the HF layout first (once, cached beside it: `r1v.model.convert.hf_view`); a
    manifest directory (a projector-only stage's output) is built from the parts it names, which are verified."""
    p = hf_view(_require_dir(path))
    if is_manifest_dir(p):
        return load_manifest_model(p, dtype)
    model = InternVLForConditionalGeneration.from_pretrained(p, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model.eval(), tokenizer


def save_llm(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write a standalone causal LM (the substitute or the reasoning LLM) and its tokenizer, atomically."""
    return save_model(llm, tokenizer, path)


def load_llm(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM saved by `save_llm` (or any local Hugging Face causal LM directory) in eval mode."""
    p = _require_dir(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model.eval(), tokenizer
