"""Which parameters train: the R1V recipe trains only the projector, with vision tower and LLM frozen."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

GROUPS: tuple[str, ...] = ("vision", "projector", "llm")

_MODULE_GROUP = {
    "vision_tower": "vision",
    "multi_modal_projector": "projector",
    "language_model": "llm",
    "lm_head": "llm",
}


def param_group_of(name: str) -> str:
    """Group of an `InternVLForConditionalGeneration` parameter name (wrapper prefixes like `module.` ok)."""
    for part in name.split("."):
        if part in _MODULE_GROUP:
            return _MODULE_GROUP[part]
    raise ValueError(f"parameter {name!r} belongs to none of the groups {GROUPS}")


def _numel(p: nn.Parameter) -> int:
    """Full size, also for a DeepSpeed ZeRO-3 partitioned parameter (whose local numel is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def apply_freeze(model: nn.Module, trainable: Iterable[str] = ("projector",)) -> dict[str, int]:
    """Set requires_grad by group; return the number of trainable parameters per group (all groups listed)."""
    wanted = set(trainable)
    unknown = sorted(wanted - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}: choose from {GROUPS}")
    counts = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        group = param_group_of(name)
        param.requires_grad_(group in wanted)
        if group in wanted:
            counts[group] += _numel(param)
    return counts


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters: what travels to rollout engines and projector checkpoints.

    Under ZeRO-3 call it inside `deepspeed.zero.GatheredParameters`, or the copies are empty partitions.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
