"""`workflows/r1v-38b.yaml`, the paper's whole recipe: it loads with the paper's numbers and wiring, and
`r1v plan` sizes every stage of it (fits on 64 x 80 GB, refuses too few GPUs, needs its assumptions)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from r1v.cli import main
from r1v.eval.config import EvalConfig
from r1v.rl.config import GRPOConfig
from r1v.train.config import SFTConfig
from r1v.workflow import kinds
from r1v.workflow.schema import load_workflow

ROOT = Path(__file__).resolve().parent.parent
R1V_38B = ROOT / "workflows" / "r1v-38b.yaml"


def test_r1v_38b_loads_with_the_papers_numbers():
    from r1v.distill.config import DistillConfig, DistillScoreConfig
    from r1v.distill.quality import DRLC_COLUMNS
    from r1v.rounds.config import GenerateConfig, ScoreConfig, SelectConfig
    from r1v.workflow.runner import topo_order

    wf = load_workflow(R1V_38B)  # placeholder paths: nothing needs to exist
    stages, cfg = wf.config.stages, wf.stage_configs
    assert all(s.kind in kinds.BUILTIN for s in stages.values())
    rounds = [f"round{t}_{s}" for t in (1, 2, 3, 4) for s in ("generate", "select", "distill", "sft")]
    order = [s for s in topo_order(wf) if stages[s].kind not in ("data.import", "eval")]
    assert order == [
        "substitute",
        "align_2m",
        "judge_align",
        "data_hq",
        "align_hq",
        "align_cot",
        "reassemble",
        "distill_score",
        "distill",
        "sft",
        "rm_full",
        *rounds,
        "grpo_prompts",
        "grpo",
    ]
    for name, c in cfg.items():  # every reference names an output its stage kind makes
        for value in c.model_dump(mode="json").values():
            if isinstance(value, str) and (m := re.match(r"^@(\w+)\.(\w+)$", value)):
                assert m.group(2) in kinds.get(stages[m.group(1)].kind).outputs, (name, value)
    assert {stages[n].kind for n in ("substitute", "reassemble")} == {"model.assemble"}
    assert cfg["reassemble"].projector == "from_vision"

    # projector initialisation: 2M at 2e-4, the judge's subset at 4e-5, 40K CoT at 4e-5; then the hybrid
    # optimisation: Stage 1, and four rounds at 1e-4 then 2e-5
    sfts = {n: c for n, c in cfg.items() if isinstance(c, SFTConfig)}
    assert {n: c.optim.lr for n, c in sfts.items()} == {
        "align_2m": 2e-4,
        "align_hq": 4e-5,
        "align_cot": 4e-5,
        "sft": 4e-5,
        "round1_sft": 1e-4,
        "round2_sft": 2e-5,
        "round3_sft": 2e-5,
        "round4_sft": 2e-5,
    }
    assert [sfts[n].model for n in ("align_2m", "align_hq", "align_cot")] == [
        "@substitute.model",
        "@align_2m.model",
        "@align_hq.model",
    ]
    for c in sfts.values():
        t = c.trainer
        assert t.num_workers * c.batch_size * c.grad_accum == 512 and c.epochs == 1
        assert (c.optim.weight_decay, c.optim.warmup_ratio, c.preprocess.max_length) == (0.05, 0.03, 16384)
        assert (t.use_gpu, t.dtype, t.zero_stage, c.trainable, c.preprocess.max_tiles) == (
            True,
            "bfloat16",
            3,
            ["projector"],
            12,
        )

    # the judge-chosen subset: an LLM judge (a served endpoint, key from the environment) scores the 2M corpus
    judge, hq = cfg["judge_align"], cfg["data_hq"]
    assert isinstance(judge, ScoreConfig) and isinstance(hq, SelectConfig)
    assert judge.corpus == "@data_align.corpus" and judge.scorer.kind == "openai"
    assert judge.scorer.api_key_env and judge.scorer.images
    assert (hq.corpus, hq.score_column, hq.errors) == ("@judge_align.corpus", judge.column, None)
    assert sfts["align_hq"].corpus == "@data_hq.corpus"

    # AL-CoTD before Stage 1: D rated once (QDAM/VTIA by served judges, DRLC's penalty column), its chains
    # rewritten by the re-assembled model at those penalties, wrong ones by the judge; Stage 1 trains on the result
    qs, d0 = cfg["distill_score"], cfg["distill"]
    assert isinstance(qs, DistillScoreConfig) and isinstance(d0, DistillConfig)
    assert qs.corpus == "@data_full.corpus"
    for j in (qs.vision_judge, qs.text_judge, qs.integration_judge):
        assert j is not None and j.scorer.kind == "openai" and j.scorer.api_key_env == judge.scorer.api_key_env
        assert j.scorer.base_url == judge.scorer.base_url
        assert "{question}" in j.scorer.prompt and "{response}" not in j.scorer.prompt  # rates the question alone
    assert qs.vision_judge.scorer.images  # S_v rates the image
    assert (d0.model, d0.corpus, sfts["sft"].model, sfts["sft"].corpus) == (
        "@reassemble.model",
        "@distill_score.corpus",
        "@reassemble.model",
        "@distill.corpus",
    )
    assert d0.penalty_column in DRLC_COLUMNS  # the penalty distill_score writes
    assert (d0.judge.kind, d0.judge.base_url, d0.judge.api_key_env) == (
        "openai",
        judge.scorer.base_url,
        judge.scorer.api_key_env,
    )
    assert d0.judge.images and "{response}" in d0.judge.prompt  # the default rewrite prompt
    assert d0.preprocess.max_length + d0.sampling.max_new_tokens == sfts["sft"].preprocess.max_length
    # the file's header: Stage 1's rewriter and the rounds' are set by two overrides (an anchor is copied where used)
    one = load_workflow(R1V_38B, ["stages.distill.config.judge.base_url=http://w:1/v1"]).stage_configs
    assert {n for n, c in one.items() if isinstance(c, DistillConfig) and c.judge.base_url == "http://w:1/v1"} == {
        "distill"}
    moved = load_workflow(R1V_38B, ["stages.distill.config.judge.base_url=http://w:1/v1",
                                    "stages.round.repeat.stages.distill.config.judge.base_url=http://w:1/v1"]
                          ).stage_configs
    assert {moved[n].judge.base_url for n in moved if isinstance(moved[n], DistillConfig)} == {"http://w:1/v1"}

    # iterative SFT: round t answers D with M_{t-1}, selects RM >= tau_t plus those errors, has M_{t-1} distil
    # that selection's chains, trains M_{t-1} on them. D from Stage 1 on is the distilled corpus.
    rm = cfg["rm_full"]
    assert isinstance(rm, ScoreConfig) and rm.corpus == "@distill.corpus" and rm.scorer.kind == "openai"
    assert (rm.column, rm.min_score, rm.max_score) == ("rm_score", 0, 5)
    for t, tau in zip((1, 2, 3, 4), (2, 3, 4, 5), strict=True):
        gen, sel, sft = cfg[f"round{t}_generate"], cfg[f"round{t}_select"], cfg[f"round{t}_sft"]
        dis = cfg[f"round{t}_distill"]
        assert isinstance(gen, GenerateConfig) and isinstance(sel, SelectConfig) and isinstance(dis, DistillConfig)
        m_prev = "@sft.model" if t == 1 else f"@round{t - 1}_sft.model"
        assert (gen.model, gen.corpus, gen.greedy) == (m_prev, "@distill.corpus", True)
        assert (sel.corpus, sel.score_column, sel.tau) == ("@rm_full.corpus", "rm_score", tau)
        assert (sel.errors, sel.error_if) == (f"@round{t}_generate.corpus", "wrong")
        assert (dis.model, dis.corpus) == (m_prev, f"@round{t}_select.corpus")
        assert dis.model_dump(exclude={"model", "corpus"}) == d0.model_dump(exclude={"model", "corpus"})
        assert (sft.model, sft.corpus) == (m_prev, f"@round{t}_distill.corpus")
        assert cfg[f"round{t}_eval"].model == f"@round{t}_sft.model"
        assert cfg[f"round{t}_eval"].report_stage == f"round{t}_sft"

    # GRPO on the prompts of D with RM = 5, from the last round's model
    g, prompts = cfg["grpo"], cfg["grpo_prompts"]
    assert isinstance(g, GRPOConfig) and isinstance(prompts, SelectConfig)
    assert (g.model, g.corpus) == ("@round4_sft.model", "@grpo_prompts.corpus")
    assert (prompts.corpus, prompts.tau, prompts.errors) == ("@rm_full.corpus", rm.max_score, None)
    assert (g.optim.lr, g.group_size, g.sampling.temperature, g.sampling.max_new_tokens) == (1e-6, 8, 1.0, 8192)
    evals = {n: c for n, c in cfg.items() if isinstance(c, EvalConfig)}
    assert {c.benchmark for c in evals.values()} == {"mmmu", "mathvista", "math500", "aime24"}
    assert {evals[n].benchmark for n in evals if evals[n].model == "@grpo.model"} == {
        "mmmu",
        "mathvista",
        "math500",
        "aime24",
    }
    for c in evals.values():
        s = c.sampling
        assert (c.samples, s.temperature, s.top_p, s.repetition_penalty, s.max_new_tokens) == (
            5,
            0.6,
            0.95,
            1.05,
            65536,
        )


def test_r1v_38b_plan_fits_64_gpus_of_80gb(capsys):
    assert main(["plan", str(R1V_38B), "--gpus", "64", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^stage\s+kind\s+role\s+GPUs\s+params\s+train\s+weights\s+grads\s+optim\s+activ\s+total", out, re.M
    )
    wf = load_workflow(R1V_38B)
    for name in wf.config.stages:
        assert re.search(rf"^{name}\s", out, re.M), name
    assert re.search(r"^align_2m\s+sft\s+train\s+64\s+38\.39B\s+91\.79M\s.*\syes\s", out, re.M)
    for t in (1, 2, 3, 4):  # the rounds: 64 GPUs of vLLM engines answer D; the judge's endpoint costs none here
        assert re.search(rf"^round{t}_generate\s+generate\s+engine\s+64\s+38\.39B\s.*\syes\s", out, re.M)
        assert re.search(rf"^round{t}_select\s+select\s+cpu\s+-\s", out, re.M)
        assert re.search(rf"^round{t}_sft\s+sft\s+train\s+64\s.*\syes\s", out, re.M)
    assert re.search(r"^rm_full\s+score\s+openai\s+-\s", out, re.M)
    assert re.search(r"served outside the GPUs planned here \(rm_full\)", out)
    assert re.search(r"generate: at most [\d.]+ PFLOP per corpus row .*\(round1_generate, round2_generate", out)
    # AL-CoTD: the question judges are served outside (one note, each stage named once); the distill engines
    # fill the 64 GPUs like generate's, one 16K-token chain per row
    assert re.search(r"^distill_score\s+distill\.score\s+openai\s+-\s", out, re.M)
    assert re.search(
        r"\(model 'judge'\): served outside the GPUs planned here \(judge_align, distill_score\)$", out, re.M
    )
    for name in ("distill", *(f"round{t}_distill" for t in (1, 2, 3, 4))):
        assert re.search(rf"^{name}\s+distill\s+engine\s+64\s+38\.39B\s.*\syes\s", out, re.M), name
    assert re.search(
        r"distill: at most [\d.]+ PFLOP per corpus row \(1 x 16384 tokens\) \(distill, round1_distill, "
        r"round2_distill, round3_distill, round4_distill\)",
        out,
    )
    assert re.search(r"^  rewriter at http://judge\.example:8000/v1 .* \(distill, round1_distill, ", out, re.M)
    assert "assumed" not in out  # the stages' own settings (checkpointing, GRPO micro-batches) make it fit
    assert "every stage fits on 64 GPUs x 80.0 GB" in out


def test_impossible_plan_is_refused_naming_stage_and_shortfall(capsys):
    assert main(["plan", str(R1V_38B), "--gpus", "1", "--gpu-memory", "24GB"]) == 1
    err = capsys.readouterr().err
    assert "refused: stage 'align_2m' needs 64 GPUs, 63 more than the 1 given" in err
    m = re.search(
        r"refused: stage 'align_2m' \(train\) needs ([\d.]+) GB per GPU, ([\d.]+) GB more than the "
        r"24\.0 GB given",
        err,
    )
    assert m and float(m.group(1)) - float(m.group(2)) == pytest.approx(24.0, abs=0.11)


def test_without_checkpointing_and_micro_batches_the_papers_sizes_do_not_fit(capsys):
    """Without activation checkpointing, and GRPO's group in one forward, at 16K tokens: refused."""
    argv = [
        "plan",
        str(R1V_38B),
        "--gpus",
        "64",
        "--gpu-memory",
        "80GB",
        "stages.sft.config.trainer.activation_checkpointing=false",
        "stages.grpo.config.trainer.activation_checkpointing=false",
        "stages.grpo.config.micro_batch=null",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "refused: stage 'sft' (train) needs" in captured.err
    assert "refused: stage 'grpo' (train) needs" in captured.err
    assert "assumed" not in captured.out


# --------------------------------------------------------------------------- the plan section and folders
