"""Engines that die or hang: an engine actor killed by pid is restarted by Ray, gets the trained weights back and
the rollout it lost is re-run with the same result; a hung engine fails the call (and a GRPO stage) within its
deadline, naming the engine. (A killed engine in a GRPO stage on the multi-node cluster, against an unkilled run:
tests/cluster/test_engine_kill.py.) Real Ray actors; the test host (`tests/plugins/r1v_test_engines.py`) only adds
control files (hang, wait to be killed) to the real engine."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from r1v_test_engines import ControlledHost

from r1v.core.errors import NotRetryable
from r1v.generation.engines import (
    EngineGoneError,
    EngineHungError,
    EngineLostError,
    Engines,
    Request,
    start_engines,
)

SAMPLING = {"temperature": 1.0, "max_new_tokens": 6}


def _model(tiny_assets, where: Path) -> Path:
    """A copy of the tiny VLM in a directory of the test's own: the test host's control files go beside it."""
    where.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(tiny_assets["model"], where / "vlm"))


def _request(tiny_assets) -> Request:
    import numpy as np

    from r1v.core.config import PreprocessConfig
    from r1v.data.pipeline import prepare_prompts
    from r1v.data.reader import read_rows

    rows = read_rows(tiny_assets["train"], np.arange(1), columns=["id", "images", "messages", "answer", "source"])
    (p,), _ = prepare_prompts(rows.drop_columns(["row"]).to_pylist(), tiny_assets["model"], PreprocessConfig())
    return Request(p["input_ids"], p["pixel_values"], p["n_tiles"])


def _projector(tiny_assets) -> dict[str, torch.Tensor]:
    from r1v.model.io import load_model

    model, _ = load_model(tiny_assets["model"])
    g = torch.Generator().manual_seed(3)
    return {n: p.detach() + 0.5 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
            if "multi_modal_projector" in n}


def _tokens(groups) -> list[list[int]]:
    return [c.token_ids for g in groups for c in g]


def test_a_hung_engine_fails_the_call_within_its_deadline_naming_it(ray_cluster, tiny_assets, tmp_path):
    import ray

    model = _model(tiny_assets, tmp_path)
    (model.parent / "hang").touch()
    handles = start_engines("transformers", str(model), 1, 0, 0, 8, host=ControlledHost, ready_timeout_s=300)
    try:
        engines = Engines(handles, call_timeout_s=3.0, ready_timeout_s=300)
        (where,) = engines.ready()
        t0 = time.monotonic()
        with pytest.raises(EngineHungError) as err:
            engines.call("generate", [0], [_request(tiny_assets)], SAMPLING, 1, 0)
        took = time.monotonic() - t0
        assert 3.0 <= took < 3.0 + 15, took
        msg = str(err.value)
        assert msg.startswith(f"engine 0 (actor {handles[0]._actor_id.hex()}, pid {where['pid']} on node "
                              f"{where['ip']} ("), msg
        assert "generate did not return within 3 s" in msg
        # a Ray Train restart of the trainers would meet the same hung actor: the stage fails at once
        assert isinstance(err.value, NotRetryable)
    finally:
        ray.kill(handles[0])


def test_a_killed_engine_comes_back_and_rolls_out_only_once_its_weights_are_back(ray_cluster, tiny_assets,
                                                                                  tmp_path):
    import ray

    model = _model(tiny_assets, tmp_path)
    handles = start_engines("transformers", str(model), 1, 0, 0, 8, host=ControlledHost, max_restarts=1,
                            ready_timeout_s=300)
    try:
        engines = Engines(handles, call_timeout_s=300, ready_timeout_s=300)
        req, new = _request(tiny_assets), _projector(tiny_assets)
        (first,) = engines.ready()
        engines.call("update_weights", [0], new, 7)
        assert engines.call("commit_weights", [0], 7, 1) == [True]
        before = _tokens(engines.call("generate", [0], [req], SAMPLING, 3, 11, version=7)[0])

        os.kill(first["pid"], signal.SIGKILL)
        # the next call meets the actor restarting (unavailable) or restarted (holding the base weights)
        with pytest.raises(EngineLostError, match=r"^engine 0 \(actor .*\) lost during generate"):
            engines.call("generate", [0], [req], SAMPLING, 3, 11, version=7)
        (second,) = engines.ready()
        assert second["pid"] != first["pid"] and second["version"] is None
        assert (model.parent / "starts").read_text().split() == [str(first["pid"]), str(second["pid"])]
        with pytest.raises(EngineLostError, match="StaleEngineError: asked for a rollout under weights 7, holds "
                           "None"):
            engines.call("generate", [0], [req], SAMPLING, 3, 11, version=7)
        # a push is committed only when all its parts reached this process, in order; a repeated push starts over
        part1 = dict(list(new.items())[1:])
        engines.call("update_weights", [0], part1, 7, 1)
        assert engines.call("commit_weights", [0], 7, 2) == [False]
        engines.call("update_weights", [0], dict(list(new.items())[:1]), 7, 0)
        engines.call("update_weights", [0], part1, 7, 1)
        assert engines.call("commit_weights", [0], 7, 2) == [True]
        assert _tokens(engines.call("generate", [0], [req], SAMPLING, 3, 11, version=7)[0]) == before

        os.kill(second["pid"], signal.SIGKILL)  # its one restart is used up
        with pytest.raises(EngineGoneError, match=r"engine 0 \(actor .*\) is dead and Ray will not restart it"):
            engines.ready()
    finally:
        ray.kill(handles[0])


def test_the_eval_pool_resends_a_killed_engines_chunks_and_names_a_hung_one(ray_cluster, tiny_assets, tmp_path):
    import ray
    from r1v_test_engines import ControlledEvalHost

    from r1v.generation.warm_pool import EnginePool

    model = _model(tiny_assets, tmp_path)
    req = _request(tiny_assets)
    calls = [([req], SAMPLING, 2, seed) for seed in range(4)]
    pool = EnginePool(("t",), start_engines("transformers", str(model), 1, 0, 0, 8, host=ControlledEvalHost, wait=False,
                                            max_restarts=1), 1, 300, 300)
    try:
        pool.load("transformers", tiny_assets["model"], 8, "float32", {})  # a model swap a restart must redo
        plain = [_tokens(r) for r in pool.run(calls, "plain")]
        (model.parent / "kill-at-seed").write_text("2")
        killer = threading.Thread(target=_kill_when_waiting, args=(model.parent,), daemon=True)
        killer.start()
        again = [_tokens(r) for r in pool.run(calls, "killed")]
        killer.join(timeout=5)
        assert again == plain
        assert len((model.parent / "starts").read_text().split()) == 2
        (model.parent / "hang").touch()
        pool.engines.call_timeout_s = 3.0
        t0 = time.monotonic()
        with pytest.raises(EngineHungError, match=r"^engine 0 \(actor .*\): generate did not return within 3 s"):
            pool.run(calls, "hung")
        assert time.monotonic() - t0 < 3.0 + 15
    finally:
        for h in pool.handles:
            ray.kill(h)


def _kill_when_waiting(control: Path, timeout: float = 600) -> None:
    """Kill the engine that waits in `kill-at-seed` (SIGKILL, by the pid it wrote), once."""
    t0 = time.monotonic()
    while not (control / "pid").exists():
        if time.monotonic() - t0 > timeout:
            return
        time.sleep(0.2)
    (control / "killed").touch()  # before the kill: the restarted engine re-runs the call without waiting
    os.kill(int((control / "pid").read_text()), signal.SIGKILL)


# --------------------------------------------------------------------------- GRPO


def _grpo(model: str, corpus: str, **kw):
    from r1v.rl.config import GRPOConfig

    cfg = dict(model=model, corpus=corpus, steps=3, prompts_per_step=1, group_size=2, rewards={"digits": 1.0},
               reward_modules=["r1v_test_rewards"], sampling={"max_new_tokens": 4}, checkpoint_every=100,
               trainer={"seed": 0})
    return GRPOConfig(**{**cfg, **kw})


def _metrics(uri: str, run_id: str) -> dict[int, dict[str, float]]:
    """Every logged metric by step, less the timings and the progress reports (sent every few seconds, so on
    steps that differ between any two runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key.endswith("seconds") or key.startswith("progress/"):
            continue
        for m in client.get_metric_history(run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_hung_engine_fails_grpo_within_its_deadline_naming_it(ray_cluster, tiny_assets, tmp_path):
    from r1v.rl.grpo import train_grpo

    model = _model(tiny_assets, tmp_path)
    (model.parent / "hang").touch()
    with pytest.raises(Exception, match=r"engine 0 \(actor [0-9a-f]+, pid \d+ on node .*\): generate did not "
                       r"return within 3 s \(engine.call_timeout_s") as err:
        train_grpo(_grpo(str(model), tiny_assets["train"], steps=1, engine={"call_timeout_s": 3.0},
                         trainer={"seed": 0, "num_workers": 1}),  # the one engine, of the one worker
                   tmp_path / "grpo", None, None, host=ControlledHost)
    failed = time.time()
    started = float((model.parent / "generate-started").read_text())
    # the deadline, then Ray Train's teardown (a second worker group fails at once on the not-retryable marker)
    print(f"hung engine: generate started to stage failed {failed - started:.1f} s (deadline 3 s)")
    assert failed - started < 3.0 + 90, (failed - started, err.value)
