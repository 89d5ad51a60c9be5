"""The miniature world's R1V model and requests to it, shared by the vLLM engine tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from r1v.generation.engines import Request


def world_r1v(root: Path, images: int, text: str) -> dict[str, Any]:
    """The R1V model of the miniature world (manifest: the substitute VLM's tower and projector + the reasoning
    LLM) under `root`, and requests: `images` image problems (test split, seed 0) and one text-only prompt."""
    from r1v.data.prompt import encode_prompt
    from r1v.model.assemble import num_image_tokens
    from r1v.model.io import load_model
    from r1v.model.manifest import reassemble_model
    from r1v.world.domain import image_question, make_problem
    from r1v.world.load import substitute_vlm
    from r1v.world.render import render_digits, tile_array

    sub = substitute_vlm(None, 0, root / "substitute")
    path = reassemble_model(sub["model"], sub["reasoning_llm"], root / "r1v")
    model, tok = load_model(path)
    rng = random.Random(0)
    reqs = []
    for _ in range(images):
        p = make_problem(rng, "test")
        ids = encode_prompt([{"role": "user", "content": image_question(p)}], tok, [1], num_image_tokens(model))
        reqs.append(Request(ids, tile_array(render_digits(p.digits, rng))[None].tobytes(), 1))
    reqs.append(Request(encode_prompt([{"role": "user", "content": text}], tok, [], 0)))
    return {"path": str(path), "root": root, "requests": reqs, "model": model, "tokenizer": tok}
