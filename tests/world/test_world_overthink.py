"""Overthinking: redundant `Check:` restatements in the reasoning chains (the chain writer, the SFT corpus option),
a closing a repetition penalty never weighs against, and the reasoning-only rebuild from a world's shipped base."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from r1v.core.config import ConfigError
from r1v.data.prompt import encode_prompt
from r1v.grading.rewards import accuracy, format_reward
from r1v.workflow.schema import validate_workflow
from r1v.world.build import WORLD_DIR, WorldBuildConfig, verify_world
from r1v.world.config import OverthinkConfig, WorldDataConfig
from r1v.world.corpora import generate
from r1v.world.domain import (
    CHECK,
    CLOSING,
    THINK_END,
    Problem,
    draw_checks,
    image_question,
    make_problem,
    overthought_answer,
    reasoning_answer,
    text_question,
)
from r1v.world.lm import chain_stats

CFG = OverthinkConfig()  # {1: 0.7, 2: 0.5, 3: 0.3}, 1-3 checks


def _parts(chain: str) -> list[str]:
    """A chain's sentences (`A = 3, C = 5.`, `Check: 3 * 5 = 15.`), in order; the closing left off."""
    body = chain.removesuffix(CLOSING)
    out: list[str] = []
    for piece in body.split(". "):
        out.append(piece if piece.endswith(".") else piece + ".")
    return out


def test_checks_on_the_configured_share_and_each_restates_a_segment_just_written() -> None:
    rng = random.Random(0)
    carried: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for i in range(3000):
        p = make_problem(rng, "train", level=1 + i % 3)
        checks = draw_checks(p, rng, CFG)
        carried[p.level].append(sum(checks))
        answer = overthought_answer(p, checks)
        chain = answer.removeprefix("<think>\n").split(THINK_END)[0]
        assert chain.endswith(CLOSING)
        last = None
        for part in _parts(chain):  # every check repeats, word for word, the segment written before it
            if part.startswith(CHECK):
                assert part.removeprefix(CHECK + " ") == last
            else:
                last = part
        assert [q for q in _parts(chain) if not q.startswith(CHECK)] == p.segments()  # checks removed: the chain
        assert " ".join(p.segments()) == p.chain()
        completion = answer.removeprefix("<think>\n")
        assert accuracy(completion, {"answer": str(p.answer)}) == 1.0 and format_reward(completion, {}) == 1.0
    for level, share in CFG.share.items():
        counts = carried[level]
        assert abs(sum(c > 0 for c in counts) / len(counts) - share) < 0.05
        assert {c for c in counts if c} == {1, 2, 3}
    only_easy = OverthinkConfig(share={1: 1.0}, min_checks=2, max_checks=2)
    for i in range(60):
        p = make_problem(rng, "train", level=1 + i % 3)
        assert sum(draw_checks(p, rng, only_easy)) == (2 if p.level == 1 else 0)
    p = Problem((3, 7, 5, 2), "A * C + D", 2)
    assert overthought_answer(p, [1, 0, 2]) == (
        "<think>\nA = 3, C = 5, D = 2. Check: A = 3, C = 5, D = 2. 3 * 5 = 15. 15 + 2 = 17. Check: 15 + 2 = 17. "
        "Check: 15 + 2 = 17. So the answer is</think>\nAnswer: \\boxed{17}")
    assert reasoning_answer(p) == ("<think>\nA = 3, C = 5, D = 2. 3 * 5 = 15. 15 + 2 = 17.\n</think>\n"
                                   "Answer: \\boxed{17}")  # the plain answer as it was


def test_the_closing_is_in_no_prompt_and_nowhere_earlier_in_the_chain() -> None:
    """A repetition penalty over prompt + generated tokens must not weigh against ending the chain."""
    tok = AutoTokenizer.from_pretrained(WORLD_DIR / "reasoning_llm")  # the tokenizer a reasoning-only rebuild keeps
    rng = random.Random(1)
    think_end = tok.convert_tokens_to_ids(THINK_END)
    for _ in range(200):
        p = make_problem(rng, "train")
        prompt_ids = set(encode_prompt([{"role": "user", "content": text_question(p)}], tok, [], 1))
        prompt_ids |= set(encode_prompt([{"role": "user", "content": image_question(p)}], tok, [1], 4))
        checks = draw_checks(p, rng, OverthinkConfig(share={1: 1.0, 2: 1.0, 3: 1.0}))
        completion = tok(overthought_answer(p, checks).removeprefix("<think>\n"))["input_ids"]
        body = tok(p.chain(checks))["input_ids"]
        assert completion[: len(body)] == body
        closing = completion[len(body) : completion.index(think_end) + 1]
        assert tok.decode(closing) == CLOSING + THINK_END
        assert not set(closing) & prompt_ids, tok.convert_ids_to_tokens(sorted(set(closing) & prompt_ids))
        assert not set(closing) & set(body)
        # the plain chain's closing newline is in every prompt: what the closing word avoids
        plain = tok(reasoning_answer(p).removeprefix("<think>\n"))["input_ids"]
        assert plain[plain.index(think_end) - 1] in prompt_ids


def test_chain_stats_count_tokens_and_checks_by_level() -> None:
    ps = [Problem((1, 2, 3, 4), "A + B", 1)] * 2 + [Problem((1, 2, 3, 4), "A * B + C", 2)]
    done = [("1 + 2 = 3. Check: 1 + 2 = 3. Check: 1 + 2 = 3.</think>Answer: \\boxed{3}", 30),
            ("1 + 2 = 3.</think> Check: after the chain does not count", 10), ("no end", 64)]
    assert chain_stats(ps, done) == {
        "1": {"n": 2, "mean_chain_tokens": 20.0, "with_check": 0.5, "with_two_checks": 0.5},
        "2": {"n": 1, "mean_chain_tokens": 64.0, "with_check": 0.0, "with_two_checks": 0.0}}


def test_corpus_option_rewrites_only_the_sft_chains_and_leaves_the_fingerprint_when_off(tmp_path) -> None:
    kw = {"n_align": 20, "n_sft": 60, "n_grpo": 10, "n_test": 9, "seed": 2}
    plain = generate(tmp_path / "a", **kw)
    over = generate(tmp_path / "b", **kw, overthink=CFG)
    for name in ("align", "grpo", "test"):
        assert pq.read_table(plain[name]).equals(pq.read_table(over[name]))
    a, b = pq.read_table(plain["sft"]).to_pylist(), pq.read_table(over["sft"]).to_pylist()
    for x, y in zip(a, b, strict=True):
        assert (x["id"], x["images"], x["answer"], x["messages"][0]) == (y["id"], y["images"], y["answer"],
                                                                         y["messages"][0])
        meta = json.loads(y["meta"])
        assert y["messages"][1]["content"].count(CHECK) == meta["checks"]
        assert y["messages"][1]["content"].endswith(f"{CLOSING}{THINK_END}\nAnswer: \\boxed{{{y['answer']}}}")
    assert 0 < sum(json.loads(y["meta"])["checks"] > 0 for y in b) < len(b)
    noisy = pq.read_table(generate(tmp_path / "c", **kw, overthink=CFG, sft_noise={"no_box": 0.25})["sft"])
    flawed = [json.loads(m) for m in noisy.column("meta").to_pylist()]
    assert Counter("flaw" in m for m in flawed) == {False: 45, True: 15}
    assert not any("checks" in m for m in flawed if "flaw" in m)

    def fingerprint(config: dict) -> str:
        return validate_workflow({"name": "t", "stages": {"d": {"kind": "data.world", "config": config}}}
                                 ).fingerprint("d")

    assert "overthink" not in WorldDataConfig(overthink=None).model_dump()
    assert fingerprint({}) == fingerprint({"overthink": None}) == "341d63bd5b66658e"  # as before the option
    assert fingerprint({"overthink": {}}) != fingerprint({})
    for bad, msg in [({"share": {4: 0.5}}, "levels are 1, 2, 3"), ({"share": {1: 1.5}}, r"in \[0, 1\]"),
                     ({"min_checks": 3, "max_checks": 2}, "min_checks 3 > max_checks 2")]:
        with pytest.raises(ConfigError, match=msg):
            fingerprint({"overthink": bad})


def test_build_config_dump_of_defaults_is_the_shipped_one() -> None:
    shipped = verify_world(WORLD_DIR)["build_config"]
    assert WorldBuildConfig.model_validate(shipped).model_dump() == shipped
    c = WorldBuildConfig(overthink={}, freeze_child_layers=2)
    assert WorldBuildConfig.model_validate(json.loads(json.dumps(c.model_dump()))) == c  # world.json round trip
    with pytest.raises(ValueError, match="freeze_child_layers 5 > num_layers 4"):
        WorldBuildConfig(freeze_child_layers=5)


def test_freeze_child_layers_keeps_the_first_layers(tmp_path) -> None:
    import torch

    from r1v.world import lm, text

    tok = AutoTokenizer.from_pretrained(WORLD_DIR / "reasoning_llm")
    model = lm.build_lm(tok, 32, 3, 2, 2, 64, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm.train_lm(model, lambda rng: lm.chat_example(tok, text.reasoning_chat(rng)), steps=3, batch=2, lr=1e-2,
                seed=0, pad_id=tok.pad_token_id, desc="t", warmup=1, freeze_layers=2, progress=lambda _: None)
    after = model.state_dict()
    for k in before:
        if k.startswith(("model.layers.0.", "model.layers.1.")):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["model.layers.2.mlp.up_proj.weight"], after["model.layers.2.mlp.up_proj.weight"])
    assert all(p.requires_grad for p in model.parameters())


SMALL = ["base_steps=8", "child_steps=8", "vision_steps=2", "eval_items=6", "base_batch=2", "child_batch=2",
         "vision_batch=2"]  # a minute on a loaded 2-core machine: what is built, not how well


def test_reasoning_only_rebuild_reuses_the_source_byte_for_byte(tmp_path, capsys) -> None:
    from r1v.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    assert main(["world", "build", "--out", str(src), *SMALL]) == 0
    s = verify_world(src)
    assert "base_llm/model.safetensors" in s["files"] and "overthink" not in s["build_config"]
    assert set(s["chains"]["by_level"]) == {"1", "2", "3"} and s["chains"]["max_new_tokens"] == 64
    capsys.readouterr()
    assert main(["world", "build", "--out", str(out), "--only", "reasoning", "--from", str(src), "overthink={}",
                 "freeze_child_layers=1"]) == 0
    assert '"chains"' in capsys.readouterr().out
    m = verify_world(out)
    assert m["reused"]["from"] == str(src) and m["reused"]["build_config"] == s["build_config"]
    assert m["build_config"]["overthink"] == {"share": {"1": 0.7, "2": 0.5, "3": 0.3}, "min_checks": 1,
                                              "max_checks": 3}
    assert m["build_config"]["child_steps"] == 8 and m["chains"]["max_new_tokens"] == 64 + 32 * 3
    assert m["vision"] == s["vision"] and m["text_accuracy"]["instruct"] == s["text_accuracy"]["instruct"]
    assert m["final_loss"]["base"] == s["final_loss"]["base"]
    assert set(m["files"]) == set(s["files"])
    changed = {name for name, digest in s["files"].items() if m["files"][name] != digest}
    # base, instruct child, tower and every tokenizer file byte for byte; the reasoning weights (and their
    # checksum record) new
    assert changed == {"reasoning_llm/model.safetensors", "reasoning_llm/r1v_checksums.json"}

    # what the source lacks or what the rebuild would change is refused before any training
    old = tmp_path / "old"  # a world built before worlds shipped their base LM
    shutil.copytree(WORLD_DIR, old, ignore=shutil.ignore_patterns("base_llm"))
    manifest = json.loads((old / "world.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("base_llm/")}
    (old / "world.json").write_text(json.dumps(manifest))
    assert main(["world", "build", "--out", str(tmp_path / "x"), "--only", "reasoning", "--from", str(old)]) == 2
    err = capsys.readouterr().err
    assert "ships no base LM" in err and "full build" in err
    assert main(["world", "build", "--out", str(tmp_path / "x"), "--only", "reasoning", "--from", str(src),
                 "hidden_size=64"]) == 2
    assert "hidden_size must stay" in capsys.readouterr().err
    assert main(["world", "build", "--out", str(tmp_path / "x"), "--only", "reasoning"]) == 2
    assert not (tmp_path / "x").exists()
