"""The transformers rollout engine: n samples per prompt with log-probs, and in-place projector updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1v.data.prompt import encode_prompt
from r1v.generation.engines import ENGINES, Request
from r1v.model.assemble import num_image_tokens
from r1v.model.io import save_model
from r1v.model.tiny import TinySpec, build_tiny_vlm


@pytest.fixture(scope="module")
def engine_and_request(tmp_path_factory):
    model, tok = build_tiny_vlm(TinySpec())
    path = save_model(model, tok, tmp_path_factory.mktemp("m") / "vlm")
    engine = ENGINES.get("transformers")(str(path))
    ids = encode_prompt([{"role": "user", "content": "<image>\nWhat is the sum?"}], tok, [1], num_image_tokens(model))
    pixels = np.random.default_rng(0).integers(0, 255, (1, 3, 56, 56), dtype=np.uint8).tobytes()
    return engine, Request(ids, pixels, 1)


def test_generate_returns_n_samples_with_logprobs(engine_and_request):
    engine, req = engine_and_request
    out = engine.generate([req, req], {"temperature": 1.0, "max_new_tokens": 8}, n=3, seed=1)
    assert [len(g) for g in out] == [3, 3]
    for comp in out[0]:
        assert 1 <= len(comp.token_ids) <= 8 and len(comp.logprobs) == len(comp.token_ids)
        assert all(lp <= 0 for lp in comp.logprobs)
        assert engine.model.config.image_token_id not in comp.token_ids  # image tokens are never sampled
    again = engine.generate([req, req], {"temperature": 1.0, "max_new_tokens": 8}, n=3, seed=1)
    assert [c.token_ids for c in again[0]] == [c.token_ids for c in out[0]]  # seeded


def test_update_weights_changes_generations_and_checks_names(engine_and_request):
    engine, req = engine_and_request
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    before = engine.generate([req], greedy, n=1, seed=0)[0][0].token_ids
    proj = {n: p for n, p in engine.model.named_parameters() if "multi_modal_projector" in n}
    new = {n: torch.randn_like(p) * 5 for n, p in proj.items()}
    assert engine.update_weights(new) == len(new)
    assert all(torch.equal(dict(engine.model.named_parameters())[n], t) for n, t in new.items())
    after = engine.generate([req], greedy, n=1, seed=0)[0][0].token_ids
    assert after != before
    with pytest.raises(KeyError, match="no parameters"):
        engine.update_weights({"nope.weight": torch.zeros(1)})
    name = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({name: torch.zeros(1)})
