"""The eval stage off the driver: engines in Ray actors give what the in-process engine gives, on 1 or 2 engines,
and the engine fields of the eval config validate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from r1v.core.config import EvalEngineConfig
from r1v.eval import corpus as stage
from r1v.eval.config import EvalConfig
from r1v.generation import service
from r1v.generation.engines import Request, TransformersEngine
from r1v.workflow import kinds, tracking

# Sampled and greedy; 2 samples per item with max_batch 3 make one item per call: several calls per engine, more
# than the pool keeps in flight. num_cpus 0.5: two engines fit the shared 2-CPU test cluster beside anything else.
SAMPLING = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 6}


def _cfg(model: str, corpus: str, **engine) -> EvalConfig:
    return EvalConfig(model=model, corpus=corpus, samples=2, sampling=SAMPLING, seed=7,
                      engine={"max_batch": 3, "num_cpus": 0.5, **engine})


def _outputs(d: Path) -> tuple[dict, str]:
    s = json.loads((d / "summary.json").read_text())
    s.pop("seconds")
    return s, (d / "predictions.jsonl").read_text()


def assert_stops(handle, within_s: float = 60.0) -> None:
    """The actor is gone within `within_s`: `ray.kill` is asynchronous, so a call sent right after it may still be
    served (seen under load); every call after the kill has landed fails."""
    import ray

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.5)
    raise AssertionError(f"actor {handle} still answers {within_s:.0f} s after it was stopped")


def test_actors_give_the_in_process_predictions_on_one_or_two_engines(ray_cluster, tiny_assets,
                                                                        tmp_path: Path) -> None:
    log = tracking.RunLogger(None, None)
    c = _cfg(tiny_assets["model"], tiny_assets["test"])
    local = stage.run_eval(c, tmp_path / "local", log)
    one = stage.run_eval(c, tmp_path / "one", log, actors=True)
    two = stage.run_eval(_cfg(tiny_assets["model"], tiny_assets["test"], num_engines=2), tmp_path / "two", log,
                         actors=True)
    base = _outputs(tmp_path / "local")
    assert _outputs(tmp_path / "one") == base
    assert _outputs(tmp_path / "two") == base
    preds = [json.loads(x) for x in base[1].splitlines()]
    assert {p["greedy"] for p in preds} == {True, False} and len(preds) == local["n"] * 3
    assert local["n"] == one["n"] == two["n"] > 0
    # Sampling did sample: the two samples of an item differ somewhere.
    sampled = {}
    for p in preds:
        if not p["greedy"]:
            sampled.setdefault(p["id"], []).append(p["response"])
    assert any(a != b for a, b in sampled.values())


def test_warm_actors_serve_the_next_eval_with_its_model_and_dtype(ray_cluster, tiny_assets, tmp_path: Path) -> None:
    """A stage keeps its actors `keep_warm_s`; the next eval loads its own model (and dtype) into them."""
    import sys
    import time

    import ray

    from r1v.generation import warm_pool as actors

    log = tracking.RunLogger(None, None)
    model, corpus = tiny_assets["model"], tiny_assets["test"]
    stage.run_eval(_cfg(model, corpus), tmp_path / "a", log, actors=True, keep_warm_s=60)
    assert actors._warm is not None
    handles = actors._warm[0].handles
    blank = EvalConfig(model=model, corpus=corpus, mode="no_image", samples=2, sampling=SAMPLING, seed=1,
                       engine={"max_batch": 4, "num_cpus": 0.5})
    stage.run_eval(blank, tmp_path / "warm", log, actors=True, keep_warm_s=60)
    assert actors._warm is not None and actors._warm[0].handles == handles  # no new actor
    stage.run_eval(blank, tmp_path / "local", log)
    assert _outputs(tmp_path / "warm") == _outputs(tmp_path / "local")

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe below runs in the actor
    with service.engine_pool(model, _cfg(model, corpus, dtype="bfloat16"), True) as pool:
        assert pool.handles == handles
        out = pool.run([([Request([1, 2, 3])], {"temperature": 0.0, "max_new_tokens": 2}, 1, 0)], "t")
        assert len(out) == 1 and len(out[0][0][0].token_ids) >= 1
        dtype, threads, opts = ray.get(handles[0].__ray_call__.remote(
            lambda host: (host.engine.model.dtype, torch.get_num_threads(),
                          (host.engine.logprobs, host.engine.static_cache))))
        assert dtype == torch.bfloat16 and threads == 1 and opts == (False, True)
    assert actors._warm is None  # keep_warm_s 0: stopped on exit
    assert_stops(handles[0])

    # Unclaimed, a warm pool stops after keep_warm_s.
    stage.run_eval(_cfg(model, corpus, num_engines=1), tmp_path / "b", log, actors=True, keep_warm_s=0.5)
    left = actors._warm[0].handles
    time.sleep(3)
    assert actors._warm is None
    assert_stops(left[0])


def test_workflow_eval_stages_generate_in_actors_kept_warm_between_them(ray_cluster, tiny_assets, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two eval stages of a workflow (Ray up): the second reuses the first one's actor; outputs as in-process. A
    stage of another kind after them stops the idle actors first, instead of leaving them holding CPUs."""

    from r1v.generation import warm_pool as actors
    from r1v.workflow.runner import Runner
    from r1v.workflow.schema import validate_workflow

    ev = {"model": tiny_assets["model"], "corpus": tiny_assets["test"], "samples": 2, "sampling": SAMPLING,
          "engine": {"max_batch": 4, "num_cpus": 0.5}}
    raw = {"name": "evals", "run_root": str(tmp_path / "runs"),
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "evals"},
           "stages": {"e1": {"kind": "eval", "config": ev},
                      "e2": {"kind": "eval", "config": {**ev, "mode": "no_image"}},
                      "after": {"kind": "data.synthetic", "needs": ["e2"], "config": {"n_train": 2, "n_test": 1}}}}
    wf = validate_workflow(raw)
    runner = Runner.create(wf, tmp_path / "runs" / "evals")
    seen = []
    real = actors.acquire

    def spy(*a, **kw):
        pool = real(*a, **kw)
        seen.append(pool.handles)
        return pool

    monkeypatch.setattr(actors, "acquire", spy)
    try:
        assert runner.run() == {"e1": "ran", "e2": "ran", "after": "ran"}
        assert len(seen) == 2 and seen[0] == seen[1]  # e2 loaded its model into e1's actor
        assert actors._warm is None  # stopped before `after`, not kept KEEP_WARM_S seconds
        assert_stops(seen[0][0])
    finally:
        actors.stop_warm()
    for name in ("e1", "e2"):
        stage.run_eval(wf.stage_configs[name], tmp_path / name, tracking.RunLogger(None, None))
        assert _outputs(runner.stage_dir(name)) == _outputs(tmp_path / name)


def test_transformers_engine_dtype(tiny_assets) -> None:
    assert TransformersEngine(tiny_assets["llm"]).model.dtype == torch.float32
    engine = TransformersEngine(tiny_assets["llm"], dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16
    out = engine.generate([Request([1, 2, 3])], {"temperature": 0.0, "max_new_tokens": 2}, 1, 0)
    assert len(out[0][0].token_ids) >= 1


def test_engine_fields_validate() -> None:
    c = EvalConfig(model="m", corpus="c")
    assert (c.engine.kind, c.engine.num_engines, c.engine.num_cpus, c.engine.num_gpus) == ("transformers", 1, 1, 0)
    assert c.engine.dtype is None and c.engine.resolved_dtype() == "float32"
    assert EvalEngineConfig(num_gpus=1).resolved_dtype() == "bfloat16"
    assert EvalEngineConfig(num_gpus=0.5, dtype="float16").resolved_dtype() == "float16"
    assert EvalEngineConfig(num_gpus=1, dtype="float32").resolved_dtype() == "float32"
    assert EvalEngineConfig(dtype="bfloat16").resolved_dtype() == "bfloat16"  # allowed on CPU, if slow
    with pytest.raises(ValueError, match="float16 needs num_gpus > 0"):
        EvalEngineConfig(dtype="float16")
    for bad in ({"num_engines": 0}, {"num_cpus": -1}, {"num_gpus": -0.5}, {"dtype": "int8"}, {"kind": ""},
                {"max_batch": 0}, {"engines": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EvalConfig(model="m", corpus="c", engine=bad)
    assert EvalEngineConfig.model_fields["dtype"].description


def test_unknown_engine_kind_fails_before_anything_starts(tmp_path: Path) -> None:
    c = EvalConfig(model="no-such-model", corpus="no-such-corpus", engine={"kind": "nope"})
    with pytest.raises(ValueError, match="engine.kind: unknown rollout engine 'nope'; known: "):
        stage.run_eval(c, tmp_path, tracking.RunLogger(None, None), actors=True)


def test_a_pool_that_reserves_nothing_outlives_stages_of_other_kinds(ray_cluster, tiny_assets, tmp_path: Path) -> None:
    """Engines with num_cpus 0 hold nothing a trainer needs: kept through another stage (iterative SFT's round SFT
    between its generate and its eval), past KEEP_WARM_S, and taken over by the next eval; one that reserves
    CPUs is stopped before that stage instead."""
    from r1v.generation import warm_pool as actors

    log = tracking.RunLogger(None, None)
    model, corpus = tiny_assets["model"], tiny_assets["test"]
    try:
        stage.run_eval(_cfg(model, corpus, num_cpus=0), tmp_path / "a", log, actors=True, keep_warm_s=0.5)
        handles = actors._warm[0].handles
        assert actors.stop_idle() is False
        time.sleep(2)  # past keep_warm_s: a free pool is kept KEEP_FREE_WARM_S
        assert actors._warm is not None and actors._warm[0].handles == handles
        stage.run_eval(_cfg(model, corpus, num_cpus=0), tmp_path / "b", log, actors=True, keep_warm_s=0.5)
        assert actors._warm[0].handles == handles  # the next eval ran in the same actors

        stage.run_eval(_cfg(model, corpus), tmp_path / "c", log, actors=True, keep_warm_s=60)  # reserves 0.5 CPU
        reserving = actors._warm[0].handles
        assert reserving != handles
        assert kinds.get("eval").warm_pool and not kinds.get("sft").warm_pool
        assert actors.stop_idle() is True
        assert actors._warm is None
        assert_stops(reserving[0])
    finally:
        actors.stop_warm()
