"""The stage-kind catalogue: every kind a workflow can name, as data.

A kind is a config class, a run function `(ctx, config) -> {output: path}`, the outputs it returns, whether a
failed attempt resumes from what it left (checkpoints, finished parts), whether it takes its engines from the
warm pool, and an optional workflow-wide check. Classes and functions are dotted paths imported only when a
workflow names the kind: validating a workflow imports the configs it uses and nothing else (no torch).

Adding a kind is one config class, one run function and one line of `BUILTIN`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from r1v.core.registry import resolve


@dataclass(frozen=True)
class StageKind:
    name: str
    config: str | type[BaseModel]
    """`module:Class` of the kind's pydantic config (or, for a kind added at run time, the class)."""
    run: str | Callable[..., dict[str, Any]]
    """`module:function` of `(ctx: StageContext, config) -> {output name: path}` (or the function)."""
    outputs: tuple[str, ...]
    """What `run` returns: the names that `@stage.output` may refer to."""
    resumable: bool = False
    """A failed attempt leaves work (checkpoints, finished parts) that the next attempt continues from."""
    warm_pool: bool = False
    """Takes its generation engines from the warm pool (`r1v.generation.warm_pool`), which then outlives it."""
    check: str | None = None
    """`module:function(stages, stage_configs, source)` run once per workflow that names this kind."""
    ray: bool = True
    """Runs on Ray: the driver starts (or joins) Ray before the first such stage, and never for a run that has
    none left to run."""

    def config_class(self) -> type[BaseModel]:
        return resolve(self.config) if isinstance(self.config, str) else self.config

    def run_function(self) -> Callable[..., dict[str, Any]]:
        return resolve(self.run) if isinstance(self.run, str) else self.run


def _kind(name: str, feature: str, config: str, run: str, outputs: str, **kw: Any) -> StageKind:
    return StageKind(name, f"r1v.{feature}.config:{config}", f"r1v.{feature}.stage:{run}", tuple(outputs.split()),
                     **kw)


BUILTIN: dict[str, StageKind] = {k.name: k for k in [
    _kind("data.synthetic", "data", "SyntheticDataConfig", "synthetic_data", "train test"),
    _kind("data.import", "data", "DataImportConfig", "data_import", "corpus quarantine report"),
    _kind("data.world", "world", "WorldDataConfig", "world_data", "align sft grpo test"),
    _kind("model.tiny", "model", "TinyModelConfig", "tiny_models", "model llm"),
    _kind("model.world", "world", "WorldModelConfig", "world_models", "model llm instruct_llm"),
    _kind("model.assemble", "model", "AssembleConfig", "assemble_stage", "model"),
    _kind("reassemble", "model", "ReassembleConfig", "reassemble_stage", "model"),
    _kind("sft", "train", "SFTConfig", "sft_stage", "model quarantine", resumable=True),
    _kind("grpo", "rl", "GRPOConfig", "grpo_stage", "model", resumable=True),
    _kind("eval", "eval", "EvalConfig", "eval_stage", "predictions summary", warm_pool=True,
          check="r1v.eval.config:check_report_roles"),
    _kind("score", "rounds", "ScoreConfig", "score_stage", "corpus quarantine summary", resumable=True),
    _kind("generate", "rounds", "GenerateConfig", "generate_stage", "corpus samples quarantine summary",
          resumable=True, warm_pool=True),
    _kind("select", "rounds", "SelectConfig", "select_stage", "corpus counts quarantine"),
    _kind("distill.score", "distill", "DistillScoreConfig", "distill_score_stage", "corpus quarantine summary",
          resumable=True),
    _kind("distill", "distill", "DistillConfig", "distill_stage", "corpus dropped summary", resumable=True,
          warm_pool=True),
]}


def get(name: str) -> StageKind:
    try:
        return BUILTIN[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known: {', '.join(sorted(BUILTIN))}") from None


def add(kind: StageKind, *, replace: bool = False) -> StageKind:
    """Add a kind that is not built in (a plugin's, a test's); an existing name needs `replace`."""
    if kind.name in BUILTIN and not replace:
        raise KeyError(f"stage kind {kind.name!r} already exists")
    BUILTIN[kind.name] = kind
    return kind


def release_idle_engines(next_kind: str | None) -> None:
    """Stop the warm pool's idle engines before a stage that cannot use them (all of them when the run ends,
    `next_kind` None), so that it does not wait for the resources they hold. Nothing to do when no stage of this
    process started engines (the pool's module was never imported)."""
    pool = sys.modules.get("r1v.generation.warm_pool")
    if pool is None:
        return
    if next_kind is None:
        pool.stop_warm()
    elif not get(next_kind).warm_pool:
        pool.stop_idle()


