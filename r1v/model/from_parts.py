"""A VLM from real parts, the R1V way (the `model.assemble` stage kind).

The vision tower (and, with `projector: from_vision`, the projector) come from an InternVL checkpoint of either
layout, read tensor by tensor without loading its LLM; the language model is any local causal LM directory
(the DeepSeek-R1-Distill-Qwen layout). Missing image / reasoning tokens are added to the LLM's tokenizer; the
rows of the added tokens, in the input embeddings and in an untied lm_head, are set to the mean of the rows of
the tokens the tokenizer had before (a neutral start that keeps logits of existing tokens unchanged); the
tables grow only when they have fewer rows than the tokenizer now has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1v.model.tokens import IMG_CONTEXT, IMG_END, IMG_START, REQUIRED_SPECIAL_TOKENS

if TYPE_CHECKING:  # the heavy imports happen inside the functions: importing this module stays cheap
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SPECIAL = (IMG_START, IMG_END, IMG_CONTEXT)
"""Added as special tokens (decoding for humans drops them); the other required tokens (`<think>`, `</think>`)
are added as plain single-id tokens, as DeepSeek-R1-Distill-Qwen has them."""

_TOWER, _PROJECTOR = "vision_tower.", "multi_modal_projector."


def add_missing_tokens(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add the REQUIRED_SPECIAL_TOKENS the tokenizer lacks, initialise their embedding rows (module docstring) and
    return them, in the order added."""
    import torch
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in vocab]
    if not missing:
        return []
    known = len(tokenizer)
    special = [AddedToken(t, special=True, normalized=False) for t in missing if t in SPECIAL]
    plain = [AddedToken(t, special=False, normalized=False) for t in missing if t not in SPECIAL]
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    if plain:
        tokenizer.add_tokens(plain)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(missing)
    tables = {id(m.weight): m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m}
    with torch.no_grad():
        for weight in tables.values():
            weight[ids] = weight[:known].float().mean(dim=0, keepdim=True).to(weight.dtype)
    return missing


def _load(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> nn.Module:
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    from r1v.model.assemble import ReassemblyError

    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ReassemblyError(f"{what} of {source}: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise ReassemblyError(f"{what} of {source}: no tensors for {on_meta[:3]}")
    return module


def assemble_from_parts(
    vision: str | Path,
    llm_dir: str | Path,
    projector: str = "fresh",
    seed: int = 0,
    dtype: str = "bfloat16",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """(VLM, tokenizer, report) from the vision tower of `vision` (HF or InternVL-chat checkpoint), the causal
    LM in `llm_dir` and a fresh (seeded) or the checkpoint's projector. The report names the added tokens."""
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    import torch
    from transformers import InternVLConfig, InternVLVisionConfig, InternVLVisionModel
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    from r1v.model.assemble import ReassemblyError, assemble
    from r1v.model.convert import read_hf_tensors
    from r1v.model.io import load_llm

    cfg, tensors = read_hf_tensors(vision, (_TOWER, _PROJECTOR))
    vision_config = InternVLVisionConfig.from_dict(cfg["vision_config"])
    ratio = float(cfg.get("downsample_ratio", 0.5))
    with torch.device("meta"):
        tower = InternVLVisionModel(vision_config)
    strip = len(_TOWER)
    _load(tower, {k[strip:]: t for k, t in tensors.items() if k.startswith(_TOWER)}, "vision tower", str(vision))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    llm, tok = load_llm(llm_dir, dtype=torch_dtype)
    added = add_missing_tokens(llm, tok)
    if added:
        log.info("added tokens %s to the tokenizer of %s", added, llm_dir)
    proj_config = InternVLConfig(
        vision_config=vision_config,
        text_config=llm.config.get_text_config(),
        downsample_ratio=ratio,
        projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
    )
    if projector == "from_vision":
        state = {k[len(_PROJECTOR) :]: t for k, t in tensors.items() if k.startswith(_PROJECTOR)}
        out = state.get("linear_2.weight")
        hidden = llm.config.get_text_config().hidden_size
        if out is not None and out.shape[0] != hidden:
            raise ReassemblyError(
                f"the projector of {vision} outputs {out.shape[0]} features but the LLM's hidden "
                f"size is {hidden}: use projector: fresh"
            )
        with torch.device("meta"):
            proj = InternVLMultiModalProjector(proj_config)
        _load(proj, state, "projector", str(vision))
    elif projector == "fresh":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            proj = InternVLMultiModalProjector(proj_config)
    else:
        raise ValueError(f"projector must be 'fresh' or 'from_vision', got {projector!r}")
    model = assemble(
        tower,
        proj,
        llm,
        tok,
        vision_config=vision_config,
        downsample_ratio=ratio,
        vision_feature_layer=int(cfg.get("vision_feature_layer", -1)),
        projector_hidden_act=proj_config.projector_hidden_act,
    )
    report = {
        "added_tokens": added,
        "projector": projector,
        "vision": str(vision),
        "llm": str(llm_dir),
        "image_token_id": int(model.config.image_token_id),
        "vocab_rows": model.lm_head.weight.shape[0],
    }
    return model.to(torch_dtype).eval(), tok, report
