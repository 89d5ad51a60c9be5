"""Save and load models with their tokenizers, atomically, and never from a hub.

A checkpoint directory is either complete or absent: a crash while saving leaves the previous version in
place, which is what the workflow's resume logic relies on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def _atomic_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temp dir beside `path`, then swap it in; the old dir goes only afterwards."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    try:
        write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _require_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no saved model at {p}: {p / 'config.json'} does not exist")
    return p


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write `model` and `tokenizer` with `save_pretrained` into `path`, replacing it atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(path, write)


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a VLM saved by `save_model` (local files only) in eval mode."""
    p = _require_dir(path)
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
