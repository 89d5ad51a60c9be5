"""Engines starting together export the VLM's LLM into the shared vLLM cache once: the others wait on the
lock and reuse it, so no engine's directory is swapped out or deleted while it loads. No vLLM needed."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import traceback
from pathlib import Path

N = 2


def _export(vlm: str, cache: str, barrier, results) -> None:
    try:
        from r1v.generation.engine_vllm import llm_dir_for

        barrier.wait()
        out = llm_dir_for(vlm, cache_dir=cache)
        inode = os.stat(out).st_ino
        # what vLLM does next: read every file of the directory it was given
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
        results.put(("ok", str(out), inode, files))
    except BaseException:
        results.put(("error", traceback.format_exc(), 0, {}))


def test_concurrent_exports_share_one_complete_directory(tmp_path) -> None:
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    vlm, tok = build_tiny_vlm(TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1))
    path = save_model(vlm, tok, tmp_path / "vlm")
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_export, args=(str(path), str(cache), barrier, results)) for _ in range(N)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [g[0] for g in got] == ["ok"] * N, "\n".join(g[1] for g in got if g[0] != "ok")
    outs = {g[1] for g in got}
    assert len(outs) == 1
    out = Path(outs.pop())
    # one export: every engine saw the directory that is still there (a second export would have replaced it)
    assert {g[2] for g in got} == {os.stat(out).st_ino}
    assert all(g[3] == got[0][3] for g in got) and "model.safetensors.index.json" in got[0][3]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.name + ".lock"])
