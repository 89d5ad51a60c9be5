"""The workflow tree: a YAML of stages (kind, needs, config) plus `a.b=c` overrides, validated at load.

Each stage's config is validated by its kind's config class (`r1v.workflow.kinds`), so a misspelt or ill-typed
key fails when the workflow is loaded, naming the file and the dotted key, not an hour into a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1v.core.config import ConfigError, RayConfig, Strict, TrackingConfig, format_errors
from r1v.core.registry import resolve
from r1v.workflow import kinds
from r1v.workflow.fingerprint import SCHEME, legacy_fingerprint, own_fingerprint
from r1v.workflow.refs import order, ref_pairs, refs
from r1v.workflow.repeat import apply_overrides_and_expand, expand_repeats


class StageSpec(Strict):
    kind: str
    needs: list[str] = []
    config: dict[str, Any] = {}


SECTIONS = {"plan": "r1v.plan.arch:PlanConfig"}
"""Workflow-wide sections that a feature owns, each validated by its class (imported only when a workflow has the
section) and, where the class has `check_stages({stage: kind})`, against the workflow's stages."""


class WorkflowConfig(Strict):
    name: str
    run_root: str = "runs"
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    seed: int | None = Field(None, description="when set, reseeds every stage: see `reseed`")
    stages: dict[str, StageSpec]
    plan: Any = Field(None, description="architectures for `r1v plan` (`SECTIONS`); `r1v run` ignores it")


class Workflow(BaseModel):
    """A loaded workflow: the validated tree plus each stage's validated config object."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str
    raw: dict[str, Any]
    config: WorkflowConfig
    stage_configs: dict[str, BaseModel]

    def fingerprint(self, stage: str, scheme: int = SCHEME) -> str:
        """The stage's own fingerprint (`r1v.workflow.fingerprint`) under `scheme`."""
        kind, config = self.config.stages[stage].kind, self.stage_configs[stage]
        return own_fingerprint(kind, config) if scheme == SCHEME else legacy_fingerprint(kind, config)


def validate_workflow(raw: dict[str, Any], source: str = "<config>") -> Workflow:

    raw = expand_repeats(raw, source)  # repeat blocks -> ordinary stages; Workflow.raw keeps the expanded form
    try:
        cfg = WorkflowConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(source, "", e)) from None
    for section, path in SECTIONS.items():
        if getattr(cfg, section) is not None:
            setattr(cfg, section, _validate_section(cfg, section, path, source))
    stage_configs: dict[str, BaseModel] = {}
    for name, spec in cfg.stages.items():
        if spec.kind not in kinds.BUILTIN:
            raise ConfigError(f"{source}: stages.{name}.kind: unknown stage kind {spec.kind!r}; known: "
                              + ", ".join(sorted(kinds.BUILTIN)))
        try:
            stage_configs[name] = kinds.get(spec.kind).config_class().model_validate(spec.config)
        except ValidationError as e:
            raise ConfigError(format_errors(source, f"stages.{name}.config", e)) from None
        if cfg.seed is not None:
            try:
                stage_configs[name] = reseed(stage_configs[name], cfg.seed)
            except ValidationError as e:
                raise ConfigError(format_errors(source, f"stages.{name}.config (after seed={cfg.seed})", e)
                                  ) from None
        for dep in spec.needs:
            if dep not in cfg.stages:
                raise ConfigError(f"{source}: stages.{name}.needs: unknown stage {dep!r}")
    _check_graph(cfg, stage_configs, source)
    for check in sorted({k.check for k in map(kinds.get, {s.kind for s in cfg.stages.values()}) if k.check}):
        resolve(check)(cfg.stages, stage_configs, source)
    return Workflow(source=source, raw=raw, config=cfg, stage_configs=stage_configs)


def _check_graph(cfg: WorkflowConfig, stage_configs: dict[str, BaseModel], source: str) -> None:
    """Every `@stage.output` names a stage of the workflow and an output its kind makes, and the stages form no
    cycle: found here, before a run directory, an MLflow run or Ray exists."""
    for name, c in stage_configs.items():
        for stage, output in sorted(ref_pairs(c)):
            if stage not in cfg.stages:
                raise ConfigError(f"{source}: stages.{name}: @{stage}.{output} refers to unknown stage {stage!r}")
            kind = kinds.get(cfg.stages[stage].kind)
            if kind.outputs and output not in kind.outputs:
                raise ConfigError(f"{source}: stages.{name}: @{stage}.{output}: a {kind.name} stage has no output "
                                  f"{output!r} (it has {', '.join(kind.outputs)})")
    try:
        order(stage_deps(cfg, stage_configs), source)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def stage_deps(cfg: WorkflowConfig, stage_configs: dict[str, BaseModel]) -> dict[str, set[str]]:
    """{stage: the stages it needs or refers to}."""
    return {n: set(s.needs) | refs(stage_configs[n]) for n, s in cfg.stages.items()}


def _validate_section(cfg: WorkflowConfig, section: str, path: str, source: str) -> BaseModel:
    try:
        value = resolve(path).model_validate(getattr(cfg, section))
    except ValidationError as e:
        raise ConfigError(format_errors(source, section, e)) from None
    if hasattr(value, "check_stages"):
        try:
            value.check_stages({name: s.kind for name, s in cfg.stages.items()})
        except ValueError as e:
            raise ConfigError(f"{source}: {section}: {e}") from None
    return value


def reseed(config: BaseModel, seed: int) -> BaseModel:
    """`config` with every field named `seed`, at any depth, set to `seed` (so `r1v run wf.yaml seed=3` reruns the
    whole recipe under another seed, and every fingerprint changes with it).

    A model's other `*_seed` fields take seed+1, seed+2, ... in declaration order, because they exist to differ
    from its `seed` (TinyModelConfig.reasoning_seed: the reasoning LLM must not be the substitute LLM).
    """
    return type(config).model_validate(_reseeded(config, seed))


def _reseeded(m: BaseModel, seed: int) -> dict[str, Any]:
    """The fields of `m` that were given, and every seed: a default left out stays a default, so a validator that
    asks which fields were set (two settings of one thing, say) sees the config as it was written."""
    out: dict[str, Any] = {}
    offset = 0
    for name in type(m).model_fields:
        value = getattr(m, name)
        if name == "seed":
            out[name] = seed
        elif name.endswith("_seed"):
            offset += 1
            out[name] = seed + offset
        elif isinstance(value, BaseModel):
            sub = _reseeded(value, seed)
            if sub or name in m.model_fields_set:
                out[name] = sub
        elif name in m.model_fields_set:
            out[name] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (the second would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given after it override its keys
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _tree(value: Any) -> Any:
    """`value` with every mapping and list copied: YAML anchors load as one shared object, and an override of one
    stage must not change the others that alias it."""
    if isinstance(value, dict):
        return {k: _tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A workflow file as independent nested dicts; ConfigError naming the file for a missing file, invalid YAML,
    a duplicate key or a top level that is not a mapping."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError(f"workflow file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return _tree(raw)


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    raw = apply_overrides_and_expand(read_yaml(path), overrides or [], str(path))
    return validate_workflow(raw, str(path))
