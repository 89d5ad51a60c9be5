"""Per-request repetition penalties (DRLC, METHOD.md section 4) in both rollout engines (vLLM's test is
`test_vllm_engine.py`'s, on the engine actor its tests share): a request's own penalty
changes its samples measurably (fewer tokens repeated from the context), and a mixed-penalty call gives each row
what a single-penalty call gives it.

The transformers tests use a tiny random VLM whose head is sharpened (x20) so that its samples often repeat
context tokens; a flat random head samples near-uniformly over 512 tokens, where a penalty has little to act on.
"""

from __future__ import annotations

import pytest
import torch

from r1v.generation.engines import ENGINES, Request

SAMPLE = {"temperature": 1.0, "max_new_tokens": 32}


def repeat_rate(prompt: list[int], toks: list[int]) -> float:
    """Fraction of generated tokens already in the context (prompt or earlier output): what the penalty damps."""
    seen, k = set(prompt), 0
    for t in toks:
        k += t in seen
        seen.add(t)
    return k / max(1, len(toks))


def mean_rate(prompt: list[int], group) -> float:
    return sum(repeat_rate(prompt, c.token_ids) for c in group) / len(group)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from r1v.data.prompt import encode_prompt
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    model, tok = build_tiny_vlm(TinySpec(), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    path = save_model(model, tok, tmp_path_factory.mktemp("pen") / "vlm")
    engine = ENGINES.get("transformers")(str(path), max_batch=8, logprobs=False)
    prompts = [encode_prompt([{"role": "user", "content": q}], tok, [], 0)
               for q in ("What is the sum of the two numbers?", "Describe the grid.")]
    return engine, prompts


def test_higher_penalty_repeats_less_in_the_same_call(tiny):
    engine, (ids, _) = tiny
    low, high, default = engine.generate([Request(ids), Request(ids, repetition_penalty=2.0), Request(ids)],
                                         {**SAMPLE, "repetition_penalty": 1.0}, n=16, seed=0)
    assert [c.token_ids for c in low] != [c.token_ids for c in high]
    # measured: 0.13 at 1.0 against 0.01 at 2.0
    assert mean_rate(ids, high) < mean_rate(ids, low) / 3
    # None takes the call's penalty: the row joins the 1.0 group, as an explicit 1.0 would
    explicit = engine.generate([Request(ids, repetition_penalty=1.0)] * 2, SAMPLE, n=16, seed=0)
    assert [[c.token_ids for c in g] for g in explicit] == [[c.token_ids for c in g] for g in (low, default)]
    # and None with the call's penalty at 2.0 is the explicit 2.0
    (via_call,) = engine.generate([Request(ids)], {**SAMPLE, "repetition_penalty": 2.0}, n=16, seed=0)
    assert [c.token_ids for c in via_call] == [c.token_ids for c in high]


def test_mixed_call_equals_single_penalty_calls(tiny):
    engine, (a, b) = tiny
    reqs = [Request(a, repetition_penalty=1.0), Request(b, repetition_penalty=2.0), Request(b, repetition_penalty=1.3),
            Request(a, repetition_penalty=2.0), Request(b, repetition_penalty=1.0)]
    mixed = engine.generate(reqs, SAMPLE, n=3, seed=7)  # 15 rows, max_batch 8: groups span several batches
    for p in (1.0, 1.3, 2.0):
        idx = [i for i, r in enumerate(reqs) if r.repetition_penalty == p]
        alone = engine.generate([reqs[i] for i in idx], SAMPLE, n=3, seed=7)
        for i, got in zip(idx, alone, strict=True):
            assert [c.token_ids for c in mixed[i]] == [c.token_ids for c in got], (p, i)

