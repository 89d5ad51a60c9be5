"""Repeat blocks: T rounds of a few stages declared once in a workflow and expanded at load into ordinary stages.

Why at load: the DAG engine (`r1v.workflow.runner`) stays ignorant of rounds. Every round is plain stages with their own
configs and fingerprints, so a failed round resumes alone, finished rounds are skipped, `r1v status` lists them,
and a config error names the expanded stage (`stages.round2_sft.config.optim.lr`).

Syntax, inside `stages:` (the paper's iterative SFT, METHOD.md section 3)::

    round:                                   # the block: it makes round1_select, round1_sft, ..., round4_generate
      repeat:
        times: 4                             # optional when `over` is given (then every list has `times` items)
        over: {tau: [2, 3, 4, 5], lr: [1.0e-4, 2.0e-5, 2.0e-5, 2.0e-5]}
        first: {sft.model: "@sft.model", generate.errors: null}   # what @prev.STAGE.OUTPUT is in round 1
        stages:                              # one round, in run order
          select: {kind: select, config: {tau: "{tau}", errors: "@prev.generate.errors"}}
          sft: {kind: sft, config: {model: "@prev.sft.model", corpus: "@this.select.corpus", optim: {lr: "{lr}"}}}
          generate: {kind: eval, config: {model: "@this.sft.model", corpus: "@data.train"}}
    grpo: {kind: grpo, config: {model: "@round.last.sft.model", ...}}

- Names: stage S of round t of block B is `B{t}_S` (`round2_sft`); `_`, not `.`, because `@stage.output`
  splits at the dot. The stages of a round follow each other in the block's order, round after round.
- Placeholders in string values of a round's stages: `{i}` (the round, 1..T), `{n}` (T), and every key of `over`
  (its i-th item), quoted (YAML reads an unquoted {tau} as a mapping). A string that is one placeholder becomes
  the value with its type ("{tau}" -> 2, not "2"); inside a longer string the value is written as text.
  `{{name}}` is the literal text `{name}`; braces around anything but a name are left alone. An unknown
  placeholder is an error.
- References (whole strings): `@this.S.OUT` is stage S of this round, `@prev.S.OUT` stage S of the previous round,
  and in round 1 the value of `first["S.OUT"]` (any YAML value: a reference, a path, null). Anywhere in the
  workflow `@B.last.S.OUT` is stage S of the block's last round. In `needs`: `this.S`, `prev.S` (dropped in
  round 1) and `B.last.S`.
- Overrides: `load_workflow` applies an override to the YAML as written when it names a declared stage (the block
  itself: `stages.round.repeat.over.tau=[1,2,3,4]`) or no stage; one naming an undeclared stage applies after
  expansion (`stages.round2_sft.config.optim.lr=3e-5`). The run directory keeps the expanded workflow, so
  `r1v resume RUN` overrides name expanded stages. A top-level `seed` reseeds the expanded stages like any other.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from pydantic import Field, ValidationError, field_validator

from r1v.core.config import ConfigError, Strict, format_errors
from r1v.core.overrides import apply_overrides, parse_override

NAME = r"[A-Za-z0-9_\-]+"  # a stage name, as `@stage.output` references accept it
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHOLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
ROUND_REF = re.compile(rf"^@(this|prev)\.({NAME})\.([A-Za-z0-9_]+)$")
ROUND_NEED = re.compile(rf"^(this|prev)\.({NAME})$")
LAST_REF = re.compile(rf"^@({NAME})\.last\.({NAME})\.([A-Za-z0-9_]+)$")
LAST_NEED = re.compile(rf"^({NAME})\.last\.({NAME})$")
BUILTIN = ("i", "n")


class RepeatSpec(Strict):
    """The `repeat:` mapping of a block."""

    times: int | None = Field(None, ge=1, description="rounds; optional when `over` gives per-round lists")
    over: dict[str, list[Any]] = Field({}, description="per-round values: placeholder {name} is the i-th item")
    first: dict[str, Any] = Field({}, description="what @prev.STAGE.OUTPUT stands for in round 1, by STAGE.OUTPUT")
    stages: dict[str, dict[str, Any]] = Field(min_length=1, description="the stages of one round, by name")

    @field_validator("over")
    @classmethod
    def _placeholder_names(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k in v:
            if not IDENT.match(k) or k in BUILTIN:
                raise ValueError(f"{k!r} cannot be a placeholder name (a letter or _, then letters, digits, _; "
                                 f"not {' or '.join(BUILTIN)})")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for k in v:
            if not re.fullmatch(NAME, k):
                raise ValueError(f"stage name {k!r}: letters, digits, _ and - only")
        return v


def is_block(spec: Any) -> bool:
    return isinstance(spec, dict) and "repeat" in spec


def expand_repeats(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """`raw` with every repeat block under `stages` replaced by its rounds' stages (a new dict; idempotent)."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return raw  # WorkflowConfig reports it
    blocks: dict[str, tuple[RepeatSpec, int]] = {}
    out: dict[str, Any] = {}
    made_by: dict[str, str] = {}

    def claim(name: str, by: str) -> None:
        if name in made_by:
            raise ConfigError(f"{source}: {by}: stage name {name!r} is also made by {made_by[name]}")
        made_by[name] = by

    for name, spec in stages.items():
        if not is_block(spec):
            claim(name, f"stages.{name}")
            out[name] = copy.deepcopy(spec)
            continue
        rep, rounds = _parse_block(name, spec, source)
        blocks[name] = (rep, rounds)
        used_first: set[str] = set()
        for i in range(1, rounds + 1):
            for sname, sspec in rep.stages.items():
                claim(f"{name}{i}_{sname}", f"stages.{name} (repeat)")
                out[f"{name}{i}_{sname}"] = _instantiate(name, rep, rounds, i, sname, sspec, used_first, source)
        unused = sorted(set(rep.first) - used_first)
        if unused:
            raise ConfigError(f"{source}: stages.{name}.repeat.first.{unused[0]}: no @prev.{unused[0]} in the "
                              "block uses it")
    out = {n: _resolve_last(spec, blocks, f"stages.{n}", source) for n, spec in out.items()}
    return {**raw, "stages": out}


def apply_overrides_and_expand(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Overrides naming a declared stage (or none) apply before expansion, the others (expanded stages) after."""
    declared = set(raw["stages"]) if isinstance(raw.get("stages"), dict) else set()
    before: list[str] = []
    after: list[str] = []
    for text in overrides:
        parts, _ = parse_override(text)
        (after if len(parts) > 1 and parts[0] == "stages" and parts[1] not in declared else before).append(text)
    return apply_overrides(expand_repeats(apply_overrides(raw, before), source), after)


# --------------------------------------------------------------------------- helpers


def _parse_block(name: str, spec: dict[str, Any], source: str) -> tuple[RepeatSpec, int]:
    where = f"stages.{name}"
    extra = sorted(set(spec) - {"repeat"})
    if extra:
        raise ConfigError(f"{source}: {where}: a repeat block has the one key `repeat` (also got {extra})")
    if not isinstance(spec["repeat"], dict):
        raise ConfigError(f"{source}: {where}.repeat: must be a mapping (times, over, first, stages)")
    try:
        rep = RepeatSpec.model_validate(spec["repeat"])
    except ValidationError as e:
        raise ConfigError(format_errors(source, f"{where}.repeat", e)) from None
    if rep.times is None and not rep.over:
        raise ConfigError(f"{source}: {where}.repeat.times: required when `over` gives no per-round lists")
    rounds = rep.times if rep.times is not None else len(next(iter(rep.over.values())))
    why = f"times is {rep.times}" if rep.times is not None else f"over.{next(iter(rep.over))} has {rounds}"
    for k, values in rep.over.items():
        if len(values) != rounds:
            raise ConfigError(f"{source}: {where}.repeat.over.{k}: {len(values)} values for {rounds} rounds ({why})")
    for key in rep.first:
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in rep.stages:
            raise ConfigError(f"{source}: {where}.repeat.first.{key}: keys are STAGE.OUTPUT with STAGE one of the "
                              f"block's stages ({', '.join(rep.stages)})")
    return rep, rounds


def _walk(value: Any, fn: Callable[[str, str], Any], path: str) -> Any:
    if isinstance(value, str):
        return fn(value, path)
    if isinstance(value, dict):
        return {k: _walk(v, fn, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fn, f"{path}.{j}") for j, v in enumerate(value)]
    return value


def _instantiate(block: str, rep: RepeatSpec, rounds: int, i: int, sname: str, sspec: dict[str, Any],
                 used_first: set[str], source: str) -> dict[str, Any]:
    """Round i's copy of stage `sname`: placeholders filled, this/prev references pointed at expanded stages."""
    values = {"i": i, "n": rounds, **{k: v[i - 1] for k, v in rep.over.items()}}
    known = ", ".join("{" + k + "}" for k in values)

    def fill(s: str, path: str) -> Any:
        if m := WHOLE.match(s):
            if m.group(1) not in values:
                raise ConfigError(f"{source}: {path}: unknown placeholder {s}; known: {known} "
                                  f"(write {{{s}}} for the literal text)")
            return copy.deepcopy(values[m.group(1)])

        def one(m: re.Match[str]) -> str:
            if m.group(1):
                return "{" + m.group(1) + "}"
            if m.group(2) not in values:
                raise ConfigError(f"{source}: {path}: unknown placeholder {m.group(0)} in {s!r}; known: {known} "
                                  f"(write {{{m.group(0)}}} for the literal text)")
            v = values[m.group(2)]
            if not isinstance(v, str | int | float | bool):
                raise ConfigError(f"{source}: {path}: {m.group(0)} in {s!r} is {v!r}; only a string that is the "
                                  "placeholder alone takes a list, mapping or null")
            return str(v)

        return PLACEHOLDER.sub(one, s)

    def ref(s: str, path: str) -> Any:
        s2 = fill(s, path)
        if not isinstance(s2, str) or not (m := ROUND_REF.match(s2)):
            return s2
        which, stage, output = m.groups()
        if stage not in rep.stages:
            raise ConfigError(f"{source}: {path}: {s2} names no stage of the block ({', '.join(rep.stages)})")
        if which == "this":
            return f"@{block}{i}_{stage}.{output}"
        key = f"{stage}.{output}"
        used_first.add(key)
        if i > 1:
            return f"@{block}{i - 1}_{stage}.{output}"
        if key not in rep.first:
            raise ConfigError(f"{source}: {path}: {s2} in round 1 needs stages.{block}.repeat.first.{key} "
                              "(what stands for the previous round's output before the first round)")
        return copy.deepcopy(rep.first[key])

    base = f"stages.{block}.repeat.stages.{sname}"
    _check_quoted(sspec, values, base, source)
    out = _walk(sspec, ref, base)
    if isinstance(out.get("needs"), list):
        needs = []
        for j, need in enumerate(out["needs"]):
            m = ROUND_NEED.match(need) if isinstance(need, str) else None
            if not m:
                needs.append(need)
            elif m.group(2) not in rep.stages:
                raise ConfigError(f"{source}: {base}.needs.{j}: {need} names no stage of the block "
                                  f"({', '.join(rep.stages)})")
            elif m.group(1) == "this":
                needs.append(f"{block}{i}_{m.group(2)}")
            elif i > 1:
                needs.append(f"{block}{i - 1}_{m.group(2)}")
        out["needs"] = needs
    return out


def _check_quoted(value: Any, values: dict[str, Any], path: str, source: str) -> None:
    """YAML reads an unquoted `tau: {tau}` as the mapping {tau: null}: say so instead of a type error later."""
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value.values())) is None and next(iter(value)) in values:
            raise ConfigError(f"{source}: {path}: write \"{{{next(iter(value))}}}\" in quotes (unquoted, YAML "
                              "reads a placeholder as a mapping)")
        for k, v in value.items():
            _check_quoted(v, values, f"{path}.{k}", source)
    elif isinstance(value, list):
        for j, v in enumerate(value):
            _check_quoted(v, values, f"{path}.{j}", source)


def _resolve_last(spec: Any, blocks: dict[str, tuple[RepeatSpec, int]], where: str, source: str) -> Any:
    """`@B.last.S.OUT` -> `@B{T}_S.OUT` and needs `B.last.S` -> `B{T}_S`, in any stage."""

    def last(block: str, stage: str, text: str, path: str) -> str:
        if block not in blocks:
            raise ConfigError(f"{source}: {path}: {text} names no repeat block (blocks: "
                              f"{', '.join(blocks) or 'none'})")
        rep, rounds = blocks[block]
        if stage not in rep.stages:
            raise ConfigError(f"{source}: {path}: {text}: block {block!r} has no stage {stage!r} "
                              f"({', '.join(rep.stages)})")
        return f"{block}{rounds}_{stage}"

    def ref(s: str, path: str) -> str:
        m = LAST_REF.match(s)
        return f"@{last(m.group(1), m.group(2), s, path)}.{m.group(3)}" if m else s

    out = _walk(spec, ref, where)
    if isinstance(out, dict) and isinstance(out.get("needs"), list):
        out["needs"] = [last(m.group(1), m.group(2), n, f"{where}.needs.{j}")
                        if isinstance(n, str) and (m := LAST_NEED.match(n)) else n
                        for j, n in enumerate(out["needs"])]
    return out
