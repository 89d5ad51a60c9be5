"""The corpus `eval` stage in its four modes, greedy accuracy next to pass@1, and its config checks.

A tiny random model answers, so scores are ~0: these tests check what the model is fed (blank tiles, text
prompts), determinism, the summary fields and the quarantine, not accuracy.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from r1v.core.config import ConfigError
from r1v.data.schema import make_row, write_corpus
from r1v.data.synthetic import render_numbers
from r1v.eval import corpus as stage
from r1v.eval.config import EvalConfig
from r1v.generation.engines import Request, TransformersEngine
from r1v.workflow import tracking
from r1v.workflow.schema import validate_workflow

SAMPLING = {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 6}
QUESTION = "What is the sum of the numbers in the image?"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Rows 0 and 1 ask the same question of different images; the last row has no text_question."""
    rng = random.Random(0)
    rows = []
    for i, (a, b) in enumerate([(1, 2), (7, 5), (3, 3), (9, 0), (4, 8)]):
        meta = {"level": 1 + i % 3, "text_question": f"What is the sum of {a} and {b}?"}
        if i == 4:
            meta.pop("text_question")
        rows.append(make_row(f"r{i}", [{"role": "user", "content": f"<image>\n{QUESTION}"},
                                       {"role": "assistant", "content": f"<think>\n{a}+{b}\n</think>\n{a + b}"}],
                             [render_numbers([a, b], 112, 56, rng)], answer=str(a + b), source="t", meta=meta))
    return str(write_corpus(rows, tmp_path_factory.mktemp("corpus") / "test"))


def _cfg(model: str, corpus: str, **kw) -> EvalConfig:
    return EvalConfig(model=model, corpus=corpus, samples=2, sampling=SAMPLING, **kw)


def _logger(tmp_path: Path) -> tuple[tracking.RunLogger, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "eval-modes", tmp_path / "artifacts")
    run_id = tracking.start_run(uri, exp, "eval")
    return tracking.RunLogger(uri, run_id), uri, run_id


def _greedy(stage_dir: Path) -> dict[str, dict]:
    preds = [json.loads(x) for x in (stage_dir / "predictions.jsonl").read_text().splitlines()]
    return {p["id"]: p for p in preds if p["greedy"]}


def test_shuffled_image_gives_each_item_another_items_image(tiny_assets, corpus: str) -> None:
    vlm, _, _ = stage.load_corpus_items(_cfg(tiny_assets["model"], corpus))
    shuf, bad, _ = stage.load_corpus_items(_cfg(tiny_assets["model"], corpus, mode="shuffled_image"))
    assert not bad and [p["input_ids"] for p in shuf] == [p["input_ids"] for p in vlm]
    own = [p["pixel_values"] for p in vlm]
    got = [p["pixel_values"] for p in shuf]
    assert sorted(got) == sorted(own)  # the same images, handed round
    assert all(g != o for g, o in zip(got, own, strict=True))  # none keeps its own
    again, _, _ = stage.load_corpus_items(_cfg(tiny_assets["model"], corpus, mode="shuffled_image"))
    assert [p["pixel_values"] for p in again] == got  # seeded


def test_shuffle_blanks_an_item_alone_with_its_tile_count() -> None:
    prompts = [{"n_tiles": 1, "pixel_values": bytes([i + 1]) * 4} for i in range(3)]
    prompts.append({"n_tiles": 2, "pixel_values": bytes([9]) * 8})
    assert stage.shuffle_images(prompts, seed=0) == 1
    assert prompts[3]["pixel_values"] == bytes(8)
    assert sorted(p["pixel_values"] for p in prompts[:3]) == [bytes([i + 1]) * 4 for i in range(3)]
    assert all(p["pixel_values"] != bytes([i + 1]) * 4 for i, p in enumerate(prompts[:3]))


def test_no_image_feeds_blank_tiles_of_the_same_count(tiny_assets, corpus: str, tmp_path: Path) -> None:
    vlm, _, _ = stage.load_corpus_items(_cfg(tiny_assets["model"], corpus))
    blank, bad, rows = stage.load_corpus_items(_cfg(tiny_assets["model"], corpus, mode="no_image"))
    assert rows == 5 and not bad
    assert [p["n_tiles"] for p in blank] == [p["n_tiles"] for p in vlm]
    assert [p["input_ids"] for p in blank] == [p["input_ids"] for p in vlm]
    for v, b in zip(vlm, blank, strict=True):
        assert len(b["pixel_values"]) == len(v["pixel_values"]) and not any(b["pixel_values"])
    assert vlm[0]["pixel_values"] != vlm[1]["pixel_values"]

    # The model sees the difference between rows 0 and 1 only through their images: with the images blanked
    # their log-probs are identical, with the images they are not.
    engine = TransformersEngine(tiny_assets["model"], logprobs=True)
    greedy = {"temperature": 0.0, "max_new_tokens": 4}

    def first_logprobs(prompts: list[dict]) -> list[list[float]]:
        reqs = [Request(p["input_ids"], p["pixel_values"], p["n_tiles"]) for p in prompts[:2]]
        return [g[0].logprobs for g in engine.generate(reqs, greedy, 1, 0)]

    lv, lb = first_logprobs(vlm), first_logprobs(blank)
    assert lb[0] == lb[1]
    assert lv[0] != lv[1]

    log, _, _ = _logger(tmp_path)
    res = stage.run_eval(_cfg(tiny_assets["model"], corpus, mode="no_image"), tmp_path / "s", log)
    g = _greedy(tmp_path / "s")
    assert g["r0"]["response"] == g["r1"]["response"]
    assert res["mode"] == "no_image" and res["n"] == 5


def test_greedy_is_deterministic_and_summary_has_every_field(tiny_assets, corpus: str, tmp_path: Path) -> None:
    log, uri, run_id = _logger(tmp_path)
    c = _cfg(tiny_assets["model"], corpus, engine={"max_batch": 3}, seed=5)
    reports: list[tuple] = []
    a = stage.run_eval(c, tmp_path / "a", log, progress=lambda step, total, **kw: reports.append((step, total, kw)))
    b = stage.run_eval(c.model_copy(update={"engine": c.engine.model_copy(update={"max_batch": 64})}),
                       tmp_path / "b", tracking.RunLogger(None, None))
    ga, gb = _greedy(tmp_path / "a"), _greedy(tmp_path / "b")
    assert {k: v["response"] for k, v in ga.items()} == {k: v["response"] for k, v in gb.items()}
    assert a["accuracy"] == b["accuracy"]

    s = json.loads(Path(a["summary"]).read_text())
    for key in ("accuracy", "stderr", "n", "items", "samples", "pass_at_1", "pass_at_1_stderr", "pass_at_1_std",
                "accuracy_first_sample", "mean_response_tokens", "mean_response_tokens_sampled",
                "accuracy_by_level", "quarantined", "quarantine_reasons", "seconds"):
        assert key in s, key
    assert (s["n"], s["items"], s["samples"], s["quarantined"], s["mode"]) == (5, 5, 2, 0, "vlm")
    assert s["stderr"] == pytest.approx(math.sqrt(s["accuracy"] * (1 - s["accuracy"]) / 5))
    assert set(s["accuracy_by_level"]) == {"1", "2", "3"}
    assert sum(v["n"] for v in s["accuracy_by_level"].values()) == 5
    assert 1 <= s["mean_response_tokens"] <= SAMPLING["max_new_tokens"]
    preds = (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 5 * (1 + 2)

    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert {"accuracy", "stderr", "pass_at_1", "pass_at_1_stderr", "mean_response_tokens"} <= set(metrics)

    # progress as engine calls returned (sequences generated, the greedy accuracy so far), then the summary's
    steps = [r[0] for r in reports]
    assert steps == sorted(steps) and steps[-1] == reports[-1][1] == 15 and len(reports) > 2
    assert all(r[2]["unit"] == "sequence" for r in reports)
    assert reports[-1][2]["accuracy"] == a["accuracy"]
    # the first items' greedy generation as an MLflow table, with the image the model saw
    client = MlflowClient(uri)
    table = json.loads(Path(client.download_artifacts(run_id, "samples/predictions.json", str(tmp_path))).read_text())
    cols = table["columns"]
    assert [row[cols.index("id")] for row in table["data"]] == ["r0", "r1", "r2", "r3", "r4"]
    assert all(row[cols.index("image")]["type"] == "image" for row in table["data"])
    assert QUESTION in table["data"][0][cols.index("question")]


def test_text_mode_asks_the_llm_the_text_question(tiny_assets, corpus: str, tmp_path: Path) -> None:
    from r1v.data.pipeline import load_tokenizer
    from r1v.model.tokens import IMG_CONTEXT

    c = _cfg(tiny_assets["llm"], corpus, mode="text")
    prompts, bad, _ = stage.load_corpus_items(c)
    assert [b["id"] for b in bad] == ["r4"] and bad[0]["reason"] == "no_text_question"
    tok = load_tokenizer(tiny_assets["llm"])
    text = tok.decode(prompts[0]["input_ids"])
    assert "What is the sum of 1 and 2?" in text and text.endswith("<think>\n")
    assert IMG_CONTEXT not in text and prompts[0]["n_tiles"] == 0

    with pytest.raises(ValueError, match="use mode 'text'"):
        stage.load_corpus_items(_cfg(tiny_assets["llm"], corpus))

    res = stage.run_eval(c, tmp_path / "t", tracking.RunLogger(None, None))
    assert (res["n"], res["quarantined"], res["quarantine_reasons"]) == (4, 1, {"no_text_question": 1})
    assert json.loads((tmp_path / "t" / "quarantine.jsonl").read_text())["id"] == "r4"


def test_text_only_engine_refuses_tiles(tiny_assets) -> None:
    engine = TransformersEngine(tiny_assets["llm"])
    assert not engine.vision
    tiles = np.zeros((1, 3, 56, 56), dtype=np.uint8).tobytes()
    with pytest.raises(ValueError, match="text-only"):
        engine.generate([Request([1, 2, 3], tiles, 1)], {"temperature": 0.0, "max_new_tokens": 2}, 1, 0)
    out = engine.generate([Request([1, 2, 3])], {"temperature": 0.0, "max_new_tokens": 2}, 1, 0)
    assert len(out[0][0].token_ids) >= 1


def test_static_cache_generates_what_the_dynamic_one_does(tiny_assets, corpus: str) -> None:
    """The eval's engine (static KV cache, no log-probs) on left-padded prompts of different lengths."""
    prompts, _, _ = stage.load_corpus_items(_cfg(tiny_assets["model"], corpus))
    reqs = [Request(p["input_ids"], p["pixel_values"], p["n_tiles"]) for p in prompts]
    reqs.append(Request(reqs[0].prompt_ids[:-3], reqs[0].pixel_values, reqs[0].n_tiles))
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    fast = TransformersEngine(tiny_assets["model"], logprobs=False, static_cache=True)
    plain = TransformersEngine(tiny_assets["model"])
    assert fast.static_cache and not plain.static_cache
    a, b = fast.generate(reqs, greedy, 1, 0), plain.generate(reqs, greedy, 1, 0)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
    assert a[0][0].logprobs == [] and len(b[0][0].logprobs) == len(b[0][0].token_ids)


def test_summary_standard_errors() -> None:
    prompts = [{"level": 1}, {"level": 1}, {"level": 2}, {"level": None}]
    c = EvalConfig(model="m", corpus="c", samples=2)
    s = stage.summarize_eval(prompts, [1.0, 0.0, 1.0, 1.0], [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]],
                        [3, 5, 4, 4], [1, 2, 3, 4, 5, 6, 7, 8], c)
    assert s["accuracy"] == 0.75 and s["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    per_item = np.array([1.0, 0.5, 0.0, 0.5])
    assert s["pass_at_1"] == 0.5
    assert s["pass_at_1_stderr"] == pytest.approx(per_item.std(ddof=1) / 2)
    assert s["mean_response_tokens"] == 4.0 and s["mean_response_tokens_sampled"] == 4.5
    assert s["accuracy_by_level"] == {"1": {"n": 2, "accuracy": 0.5, "pass_at_1": 0.75},
                                      "2": {"n": 1, "accuracy": 1.0, "pass_at_1": 0.0}}
    assert s["accuracy_first_sample"] == 0.5


def test_report_roles_are_validated() -> None:
    with pytest.raises(ValueError, match="at most one"):
        EvalConfig(model="m", corpus="c", report_stage="sft", report_baseline="no_image")
    with pytest.raises(ValueError, match="needs a corpus"):
        EvalConfig(model="m", benchmark="mathv", mode="no_image")

    def wf(**evals: dict) -> dict:
        stages = {"sft": {"kind": "reassemble", "config": {"model": "a", "llm": "b"}}}
        stages.update({n: {"kind": "eval", "config": {"model": "m", "corpus": "c", **e}} for n, e in evals.items()})
        return {"name": "w", "stages": stages}

    validate_workflow(wf(e1={"report_stage": "sft"}, e2={"report_baseline": "no_image", "mode": "no_image"}))
    with pytest.raises(ConfigError, match="e2.config.report_stage.*already reported by stage 'e1'"):
        validate_workflow(wf(e1={"report_stage": "sft"}, e2={"report_stage": "sft"}))
    with pytest.raises(ConfigError, match="e1.config.report_stage: unknown stage 'sfft'"):
        validate_workflow(wf(e1={"report_stage": "sfft"}))
    with pytest.raises(ConfigError, match="e1.config.mode"):
        validate_workflow(wf(e1={"mode": "audio"}))
