"""What a stage's fingerprint covers: the settings that change its results, and nothing else.

A stage is done while its recorded fingerprint equals the one its config has now, so the fingerprint must change
when the results would and stay put otherwise:

- operational fields (logging, checkpoint cadence and retention, threads, worker and engine counts, CPUs; marked
  with `r1v.core.config.operational`) are left out: changing them on resume re-runs nothing;
- a field at its default is left out, so a release that adds a defaulted field leaves every fingerprint as it was.
  A change of *meaning* (a default that now means something else) bumps the config class's
  `fingerprint_version`, which then enters its payload;
- a config may add derived values that decide results while the fields behind them are operational
  (`fingerprint_extra`: SFT's rows per optimizer step, which the worker count enters without a global batch).

Runs written before this scheme record no scheme in their stage states; their stages are judged by the scheme
they were written under (`legacy_fingerprint`) and move to the current one when next skipped.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from r1v.core.config import is_operational

SCHEME = 2
"""The fingerprint scheme this code writes; stage states record it (absent: scheme 1)."""

ADDED_SINCE_SCHEME_1: frozenset[str] = frozenset({
    "TrainerConfig.max_nonfinite_steps", "GRPOConfig.max_reward_failure_fraction",
    "DataImportConfig.allow_outside_root", "DataImportConfig.row_timeout_s", "SFTConfig.global_batch",
    "TrainerConfig.max_failures", "OpenAIScorerConfig.max_reply_bytes", "OpenAIRewriterConfig.max_reply_bytes",
    "SamplingConfig.repetition_penalty_scope", "DistillConfig.penalty_scope",
    *(f"{cls}.{f}" for cls in ("EngineConfig", "EvalEngineConfig")
      for f in ("max_restarts", "call_timeout_s", "ready_timeout_s")),
})
"""`Class.field` of every config field added after scheme 1 was retired: scheme 1's fingerprint of a run written
before them is computed without them while they are at their default."""


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def combine(*parts: str) -> str:
    """A stage's fingerprint from its own and its upstream stages' (order given by the caller)."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def own_fingerprint(kind: str, config: BaseModel) -> str:
    return digest({"kind": kind, "config": results_payload(config)})


def legacy_fingerprint(kind: str, config: BaseModel) -> str:
    """Scheme 1: the whole dumped config, minus the fields added since while they are at their default."""
    return digest({"kind": kind, "config": _legacy_dump(config)})


def results_payload(config: BaseModel) -> dict[str, Any]:
    """The config's results-deciding content: non-operational fields that differ from their default, nested
    configs by the same rule, the class's `fingerprint_version` when set, and its `fingerprint_extra()`."""
    dumped = config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        if is_operational(field) or name not in dumped:  # not in the dump: a serializer keeps it out on purpose
            continue
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            default = _default(field)
            payload = results_payload(value)
            if isinstance(default, BaseModel) and type(default) is type(value) and payload == results_payload(default):
                continue
            out[name] = payload
        elif not _is_default(field, dumped[name], type(config)):
            out[name] = dumped[name]
    version = getattr(type(config), "fingerprint_version", 0)
    if version:
        out["=version"] = version
    extra = getattr(config, "fingerprint_extra", None)
    if extra is not None:
        out.update({f"={k}": v for k, v in extra().items()})
    return out


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _is_default(field: FieldInfo, dumped_value: Any, cls: type[BaseModel]) -> bool:
    default = _default(field)
    if default is PydanticUndefined:  # a required field always counts
        return False
    if isinstance(default, BaseModel):
        return dumped_value == default.model_dump(mode="json")
    try:
        from pydantic import TypeAdapter

        default_json = TypeAdapter(field.annotation).dump_python(default, mode="json")
    except Exception:  # an annotation TypeAdapter cannot take: compare as given
        default_json = default
    return dumped_value == default_json


def _legacy_dump(config: BaseModel) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    if not ADDED_SINCE_SCHEME_1:
        return dumped
    out = {}
    for name, value in dumped.items():
        field = type(config).model_fields.get(name)
        attr = getattr(config, name, None)
        if field is not None and f"{type(config).__name__}.{name}" in ADDED_SINCE_SCHEME_1 \
                and _is_default(field, value, type(config)):
            continue
        out[name] = _legacy_dump(attr) if isinstance(attr, BaseModel) else value
    return out
