"""Overthinking: redundant `Check:` restatements in the reasoning chains (the chain writer, the SFT corpus option)
and a closing a repetition penalty never weighs against."""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from r1v.core.config import ConfigError
from r1v.data.prompt import encode_prompt
from r1v.grading.rewards import accuracy, format_reward
from r1v.workflow.schema import validate_workflow
from r1v.world.build import WORLD_DIR
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
