"""Repeat blocks (r1v.workflow.repeat): T rounds declared once, expanded at load into ordinary stages that run, fail and
resume one by one. Stage kinds are registered here (no Ray), like tests/test_workflow.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from r1v.cli import main
from r1v.core.config import ConfigError, Strict
from r1v.workflow import kinds
from r1v.workflow.kinds import StageKind
from r1v.workflow.repeat import expand_repeats
from r1v.workflow.runner import Runner, StageFailed, read_events
from r1v.workflow.schema import load_workflow, validate_workflow

CALLS: list[str] = []


class RoundConfig(Strict):
    text: str = "x"
    source: str | None = None
    fail_times: int = 0
    tau: float = 0
    seed: int = 0


def round_stage(ctx, c: RoundConfig):
    CALLS.append(ctx.name)
    marker = ctx.path("tries")
    tries = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(tries + 1))
    if tries < c.fail_times:
        raise RuntimeError(f"planned failure {tries + 1}")
    out = ctx.path("out.txt")
    out.write_text((Path(c.source).read_text() if c.source else "") + c.text)
    return {"out": str(out)}


kinds.add(StageKind("test.round", RoundConfig, round_stage, ()), replace=True)


def block(**repeat) -> dict:
    """A workflow: `start`, a block `round` of train -> check, and `after` reading the last round."""
    rep = {"over": {"tau": [2, 3, 4], "fail": [0, 0, 0]}, "first": {"train.out": "@start.out"},
           "stages": {"train": {"kind": "test.round", "config": {"text": "r{i}", "tau": "{tau}",
                                                                  "source": "@prev.train.out"}},
                      "check": {"kind": "test.round", "needs": ["this.train", "prev.check"],
                                "config": {"text": "c{i}/{n} tau={tau} {{i}}", "source": "@this.train.out",
                                           "fail_times": "{fail}"}}}}
    rep.update(repeat)
    return {"name": "rounds", "stages": {
        "start": {"kind": "test.round", "config": {"text": "S"}},
        "round": {"repeat": rep},
        "after": {"kind": "test.round", "needs": ["round.last.check"], "config": {"source": "@round.last.train.out",
                                                                                   "text": "A"}}}}


def write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "wf.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


# --------------------------------------------------------------------------- expansion


def test_expansion_names_orders_types_and_wires_rounds(tmp_path):
    wf = load_workflow(write(tmp_path, block()))
    stages, cfg = wf.config.stages, wf.stage_configs
    assert list(stages) == ["start", "round1_train", "round1_check", "round2_train", "round2_check",
                            "round3_train", "round3_check", "after"]
    assert [cfg[f"round{i}_train"].tau for i in (1, 2, 3)] == [2, 3, 4]
    assert isinstance(wf.raw["stages"]["round2_train"]["config"]["tau"], int)  # "{tau}" alone keeps its type
    assert cfg["round2_check"].text == "c2/3 tau=3 {i}"  # inside text; {{i}} is the literal {i}
    assert cfg["round1_train"].source == "@start.out"  # round 1: `first`
    assert cfg["round3_train"].source == "@round2_train.out"  # @prev
    assert cfg["round3_check"].source == "@round3_train.out"  # @this
    assert stages["round1_check"].needs == ["round1_train"]  # prev.check dropped in round 1
    assert stages["round3_check"].needs == ["round3_train", "round2_check"]
    assert cfg["after"].source == "@round3_train.out" and stages["after"].needs == ["round3_check"]
    assert "repeat" not in yaml.safe_dump(wf.raw)  # the run directory keeps the expanded form
    assert expand_repeats(wf.raw) == wf.raw  # idempotent: Runner.open validates it again
    fps = Runner(wf, tmp_path).fingerprints()
    assert len({fps[n] for n in stages}) == len(stages)  # every round its own fingerprint


def test_times_alone_and_a_single_placeholder_of_any_type(tmp_path):
    raw = {"name": "t", "stages": {"r": {"repeat": {"times": 2, "over": {"fail": [0, 0]}, "stages": {
        "s": {"kind": "test.round", "config": {"text": "n{n}", "fail_times": "{fail}"}}}}}}}
    wf = validate_workflow(raw)
    assert list(wf.config.stages) == ["r1_s", "r2_s"] and wf.stage_configs["r2_s"].text == "n2"
    raw["stages"]["r"]["repeat"] = {"times": 2, "stages": {"s": {"kind": "test.round"}}}
    assert list(validate_workflow(raw).config.stages) == ["r1_s", "r2_s"]


@pytest.mark.parametrize("change, message", [
    ({"tims": 3}, r"stages\.round\.repeat\.tims: Extra inputs are not permitted"),
    ({"times": 4}, r"stages\.round\.repeat\.over\.tau: 3 values for 4 rounds \(times is 4\)"),
    ({"over": {"tau": [2, 3, 4], "fail": [0, 0]}}, r"stages\.round\.repeat\.over\.fail: 2 values for 3 rounds"),
    ({"over": {"i": [1]}}, r"stages\.round\.repeat\.over: .*'i' cannot be a placeholder name"),
    ({"over": {}}, r"stages\.round\.repeat\.times: required"),
    ({"first": {}}, r"stages\.round\.repeat\.stages\.train\.config\.source: @prev\.train\.out in round 1 needs "
                    r"stages\.round\.repeat\.first\.train\.out"),
    ({"first": {"train.out": "@start.out", "check.out": None}},
     r"stages\.round\.repeat\.first\.check\.out: no @prev\.check\.out in the block uses it"),
    ({"first": {"trian.out": "x"}}, r"stages\.round\.repeat\.first\.trian\.out: keys are STAGE\.OUTPUT"),
])
def test_block_errors_name_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_workflow(write(tmp_path, block(**change)))


def test_template_errors_name_the_field(tmp_path):
    def fails(message: str, raw: dict) -> None:
        with pytest.raises(ConfigError, match=message):
            load_workflow(write(tmp_path, raw))

    raw = block()
    raw["stages"]["round"]["repeat"]["stages"]["train"]["config"]["text"] = "{tauu}"
    fails(r"wf\.yaml: stages\.round\.repeat\.stages\.train\.config\.text: unknown placeholder \{tauu\}; "
          r"known: \{i\}, \{n\}, \{tau\}, \{fail\}", raw)
    raw["stages"]["round"]["repeat"]["stages"]["train"]["config"]["text"] = "at {tauu}"
    fails(r"config\.text: unknown placeholder \{tauu\} in 'at \{tauu\}'", raw)
    raw = block()
    raw["stages"]["round"]["repeat"]["stages"]["train"]["config"]["tau"] = {"tau": None}  # YAML's tau: {tau}
    fails(r"stages\.round\.repeat\.stages\.train\.config\.tau: write \"\{tau\}\" in quotes", raw)
    raw = block()
    raw["stages"]["round"]["repeat"]["stages"]["check"]["config"]["source"] = "@this.trian.out"
    fails(r"stages\.round\.repeat\.stages\.check\.config\.source: @this\.trian\.out names no stage of the block "
          r"\(train, check\)", raw)
    raw = block()
    raw["stages"]["round"]["repeat"]["stages"]["check"]["needs"] = ["this.trian"]
    fails(r"stages\.round\.repeat\.stages\.check\.needs\.0: this\.trian names no stage", raw)
    raw = block()
    raw["stages"]["after"]["config"]["source"] = "@rounds.last.train.out"
    fails(r"stages\.after\.config\.source: @rounds\.last\.train\.out names no repeat block \(blocks: round\)", raw)
    raw = block()
    raw["stages"]["round2_check"] = {"kind": "test.round"}
    fails(r"stages\.round2_check: stage name 'round2_check' is also made by stages\.round \(repeat\)", raw)
    raw = block()
    raw["stages"]["round"]["kind"] = "test.round"
    fails(r"stages\.round: a repeat block has the one key `repeat` \(also got \['kind'\]\)", raw)
    raw = block()
    raw["stages"]["round"]["repeat"]["stages"]["check"]["config"]["fail_tims"] = 1
    fails(r"stages\.round1_check\.config\.fail_tims: Extra inputs", raw)  # each expanded stage validates


# --------------------------------------------------------------------------- overrides and seed

SFT_ROUNDS = {"name": "sft", "stages": {"round": {"repeat": {
    "over": {"lr": [1.0e-4, 2.0e-5, 2.0e-5]}, "first": {"sft.model": "/m0"},
    "stages": {"sft": {"kind": "sft", "config": {"model": "@prev.sft.model", "corpus": "/d",
                                                 "optim": {"lr": "{lr}"}, "trainer": {"seed": 9}}}}}}}}


def test_overrides_reach_the_block_and_the_expanded_stages(tmp_path):
    p = write(tmp_path, SFT_ROUNDS)
    lrs = lambda wf: [c.optim.lr for c in wf.stage_configs.values()]  # noqa: E731
    assert lrs(load_workflow(p)) == [1e-4, 2e-5, 2e-5]
    assert lrs(load_workflow(p, ["stages.round2_sft.config.optim.lr=3e-5"])) == [1e-4, 3e-5, 2e-5]
    assert lrs(load_workflow(p, ["stages.round.repeat.over.lr=[1, 2, 3]"])) == [1, 2, 3]
    # written-YAML overrides first, then those naming expanded stages: a round added by override is addressable
    wf = load_workflow(p, ["stages.round4_sft.config.optim.lr=7", "stages.round.repeat.over.lr=[1, 2, 3, 4]"])
    assert lrs(wf) == [1, 2, 3, 7] and wf.stage_configs["round4_sft"].model == "@round3_sft.model"
    with pytest.raises(ConfigError, match=r"stages\.round2_sft\.config\.optim\.learning_rate: Extra inputs"):
        load_workflow(p, ["stages.round2_sft.config.optim.learning_rate=1"])


def test_seed_reaches_every_round_and_changes_its_fingerprint(tmp_path):
    p = write(tmp_path, SFT_ROUNDS)
    assert [c.trainer.seed for c in load_workflow(p).stage_configs.values()] == [9, 9, 9]
    seeded = load_workflow(p, ["seed=5"])
    assert [c.trainer.seed for c in seeded.stage_configs.values()] == [5, 5, 5]
    a, b = Runner(load_workflow(p), tmp_path).fingerprints(), Runner(seeded, tmp_path).fingerprints()
    assert all(a[n] != b[n] for n in a)


# --------------------------------------------------------------------------- running, resuming, status


def test_failed_round_resumes_alone_and_finished_rounds_are_skipped(tmp_path, capsys):
    CALLS.clear()
    raw = block(over={"tau": [2, 3, 4], "fail": [0, 1, 0]})  # round 2's check fails once
    raw["run_root"] = str(tmp_path / "runs")
    r = Runner.create(load_workflow(write(tmp_path, raw)), tmp_path / "runs" / "r1")
    with pytest.raises(StageFailed, match="planned failure 1"):
        r.run()
    assert CALLS == ["start", "round1_train", "round1_check", "round2_train", "round2_check"]
    assert {row["stage"]: row["status"] for row in r.status_rows()} == {
        "start": "done", "round1_train": "done", "round1_check": "done", "round2_train": "done",
        "round2_check": "failed", "round3_train": "pending", "round3_check": "pending", "after": "pending"}

    assert main(["status", str(r.run_dir)]) == 0  # `r1v status` lists the expanded stages
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == list(r.wf.config.stages) and rows[4][:3] == ["round2_check", "test.round",
                                                                                     "failed"]

    CALLS.clear()
    again = Runner.open(r.run_dir)
    assert again.run() == {"start": "skipped", "round1_train": "skipped", "round1_check": "skipped",
                           "round2_train": "skipped", "round2_check": "ran", "round3_train": "ran",
                           "round3_check": "ran", "after": "ran"}
    assert CALLS == ["round2_check", "round3_train", "round3_check", "after"]
    assert Path(again.state("after")["outputs"]["out"]).read_text() == "Sr1r2r3A"  # round to round via @prev
    events = read_events(r.run_dir)
    started = [e["stage"] for e in events if e["event"] == "started"]
    assert started.count("round1_train") == 1 and started.count("round2_check") == 2
    assert [e["stage"] for e in events if e["event"] == "skipped"][:3] == ["start", "round1_train", "round1_check"]

    # a resume override names an expanded stage: that round and the ones after it re-run, earlier ones do not
    CALLS.clear()
    changed = Runner.open(r.run_dir, ["stages.round2_train.config.text=Z", "stages.round2_check.config.fail_times=0"])
    assert changed.run()["round1_check"] == "skipped"
    assert CALLS == ["round2_train", "round2_check", "round3_train", "round3_check", "after"]
    assert Path(again.state("after")["outputs"]["out"]).read_text() == "Sr1Zr3A"


def test_the_documented_yaml_loads(tmp_path):
    """The README's example, as YAML text (quoting included), with `test.round` standing in for `select`."""
    p = tmp_path / "wf.yaml"
    p.write_text("""
name: iterative
stages:
  sft: {kind: sft, config: {model: /m, corpus: /d}}
  round:
    repeat:
      over: {tau: [2, 3, 4, 5], lr: [1.0e-4, 2.0e-5, 2.0e-5, 2.0e-5]}
      first: {sft.model: "@sft.model", generate.summary: null}
      stages:
        select: {kind: test.round, config: {tau: "{tau}", source: "@prev.generate.summary"}}
        sft: {kind: sft, config: {model: "@prev.sft.model", corpus: "@this.select.out", optim: {lr: "{lr}"}}}
        generate: {kind: eval, config: {model: "@this.sft.model", corpus: /test}}
  grpo: {kind: grpo, config: {model: "@round.last.sft.model", corpus: /d}}
""")
    wf = load_workflow(p)
    assert len(wf.config.stages) == 14 and list(wf.config.stages)[-2:] == ["round4_generate", "grpo"]
    c = wf.stage_configs
    assert (c["round1_select"].tau, c["round1_select"].source, c["round4_select"].source) == (
        2, None, "@round3_generate.summary")
    assert (c["round1_sft"].model, c["round2_sft"].model, c["round2_sft"].optim.lr) == (
        "@sft.model", "@round1_sft.model", 2e-5)
    assert c["grpo"].model == "@round4_sft.model"
