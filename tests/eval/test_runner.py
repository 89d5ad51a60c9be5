"""The generation half of evaluation: paper prompts, ``r1v eval run`` and the ``eval`` stage on benchmarks.

A tiny random model answers, so scores are ~0: these tests check prompts, counts, files and MLflow logging
on the real benchmark data (MATH-Vision testmini with its real images, MATH-500), not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from r1v.core.config import PreprocessConfig
from r1v.data.pipeline import preprocess_row
from r1v.eval.config import EvalConfig
from r1v.eval.items import BenchItem
from r1v.eval.loaders import load_benchmark
from r1v.eval.prompts import (
    FREE_FORM_SUFFIX,
    MULTI_CHOICE_SUFFIX,
    R1_INSTRUCTION,
    item_to_messages,
    item_to_row,
)
from r1v.model.tokens import IMAGE_MARKER

SUMMARY_KEYS = {"benchmark", "items", "samples", "pass_at_1", "pass_at_1_std", "correct", "total",
                "per_sample", "breakdown", "quarantined", "quarantine_reasons"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r1v.model.io import save_model
    from r1v.model.tiny import TinySpec, build_tiny_vlm

    path = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = build_tiny_vlm(TinySpec())
    save_model(model, tok, path)
    return path


def _content(benchmark: str, item: BenchItem) -> str:
    msgs = item_to_messages(benchmark, item)
    assert [m["role"] for m in msgs] == ["user"]
    return msgs[0]["content"]


# --------------------------------------------------------------------------- prompts


def test_text_prompts_carry_the_r1_instruction_once(bench_root: Path) -> None:
    for name in ("math500", "aime24", "aime25"):
        item = load_benchmark(name, bench_root)[0]
        text = _content(name, item)
        assert text.count(R1_INSTRUCTION) == 1, name
        assert text.rstrip().endswith(R1_INSTRUCTION)
        assert item.question.strip() in text
        assert IMAGE_MARKER not in text


def test_mathv_multiple_choice_prompt_letters_markers_and_suffix(bench_root: Path) -> None:
    items = load_benchmark("mathv-testmini", bench_root)
    mc = next(it for it in items if it.choices)
    text = _content("mathv-testmini", mc)
    assert text.startswith(IMAGE_MARKER)
    assert text.count(IMAGE_MARKER) == len(mc.images or []) == 1
    for letter, option in zip("ABCDE", mc.choices or [], strict=False):
        assert f"\n{letter}. {option}" in text
    assert text.endswith(MULTI_CHOICE_SUFFIX)
    assert "Answer: \\boxed{$LETTER}" in text and "guess" in text and "repeat" in text

    free = next(it for it in items if not it.choices)
    text = _content("mathv-testmini", free)
    assert text.endswith(FREE_FORM_SUFFIX) and "Answer: \\boxed{$FINAL_ANSWER}" in text
    assert "<image1>" in text  # the benchmark's own placeholder stays: the question refers to it


def test_mathvista_options_are_lettered(bench_root: Path) -> None:
    items = load_benchmark("mathvista", bench_root)
    mc = next(it for it in items if it.meta["question_type"] == "multi_choice")
    text = _content("mathvista", mc)
    assert f"\nA. {mc.choices[0]}" in text and text.endswith(MULTI_CHOICE_SUFFIX)
    free = next(it for it in items if it.meta["question_type"] == "free_form")
    assert _content("mathvista", free).endswith(FREE_FORM_SUFFIX)


def test_mmmu_markers_in_front_placeholders_kept(bench_root: Path) -> None:
    image = (bench_root / "mathv" / "images" / "4.jpg").read_bytes()
    item = BenchItem(id="validation_Math_1", question="Compare <image 1> with <image 2>. Which is larger?",
                     answer="B", choices=["<image 1>", "<image 2>"], images=[image, image],
                     meta={"question_type": "multiple-choice"})
    text = _content("mmmu", item)
    assert text.startswith(IMAGE_MARKER * 2) and text.count(IMAGE_MARKER) == 2
    assert "Compare <image 1> with <image 2>." in text and "\nB. <image 2>" in text
    assert text.endswith(MULTI_CHOICE_SUFFIX)
    open_item = BenchItem(id="validation_Math_2", question="What is x in <image 1>?", answer="3",
                          images=[image], meta={"question_type": "open"})
    assert _content("mmmu", open_item).endswith(FREE_FORM_SUFFIX)


def test_rows_preprocess_with_real_images(bench_root: Path, tiny_model: Path) -> None:
    """Marker count == image count is what preprocessing checks; a literal <image> in text is neutralised."""
    pre = PreprocessConfig(max_length=4096)
    for item in load_benchmark("mathv-testmini", bench_root)[:3]:
        row = item_to_row("mathv-testmini", item)
        assert row["id"] == item.id and row["answer"] == item.answer and len(row["images"]) == 1
        enc = preprocess_row(row, str(tiny_model), pre, with_labels=False)
        assert enc["n_tiles"] >= 1 and enc["input_ids"]
    tricky = BenchItem(id="x", question="What does <image> show?", answer="2", images=[row["images"][0]])
    assert _content("mathv", tricky).count(IMAGE_MARKER) == 1
    preprocess_row(item_to_row("mathv", tricky), str(tiny_model), pre, with_labels=False)


def test_unknown_benchmark_is_named() -> None:
    with pytest.raises(ValueError, match="gpqa"):
        item_to_messages("gpqa", BenchItem(id="1", question="q", answer="a"))


# --------------------------------------------------------------------------- r1v eval run


def _run_cli(argv: list[str]) -> int:
    from r1v.cli import main

    return main(["eval", "run", *argv])


def _run_id(uri: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("r1v-eval")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0].info.run_id


def test_cli_mathv_testmini_end_to_end(tiny_model: Path, bench_root: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = _run_cli(["--model", str(tiny_model), "--benchmark", "mathv-testmini", "--samples", "2",
                   "--limit", "6", "--max-new-tokens", "8", "--out", str(out),
                   "--data-root", str(bench_root)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mathv-testmini: pass@1" in printed and "-- by subject" in printed

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 * 2
    assert {p["sample"] for p in preds} == {0, 1} and len({p["id"] for p in preds}) == 6
    assert all(isinstance(p["response"], str) and 1 <= p["n_tokens"] <= 8 for p in preds)
    verdicts = (out / "verdicts.jsonl").read_text().splitlines()
    assert len(verdicts) == 12

    s = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s)
    got = (s["benchmark"], s["items"], s["samples"], s["total"], s["quarantined"])
    assert got == ("mathv-testmini", 6, 2, 12, 0)
    assert [r["total"] for r in s["per_sample"]] == [6, 6]
    assert 0.0 <= s["pass_at_1"] <= 1.0 and s["pass_at_1_std"] >= 0.0
    assert sum(v["total"] for v in s["breakdown"]["subject"].values()) == 12
    assert s["sampling"]["max_new_tokens"] == 8 and s["sampling"]["temperature"] == 0.6

    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(_run_id(uri))
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["pass_at_1"] == pytest.approx(s["pass_at_1"]) and m["pass_at_1_std"] == pytest.approx(
        s["pass_at_1_std"])
    assert m["total"] == 12 and m["items"] == 6
    assert run.data.params["benchmark"] == "mathv-testmini"
    arts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"predictions.jsonl", "verdicts.jsonl", "summary.json"} <= arts


def test_cli_math500_text_run(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    rc = _run_cli(["--model", str(tiny_model), "--benchmark", "math500", "--samples", "2", "--limit", "3",
                   "--max-new-tokens", "8", "--out", str(out), "--tracking-uri", uri, "--workers", "0"])
    assert rc == 0
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 3 * 2
    s = json.loads((out / "summary.json").read_text())
    assert (s["items"], s["total"], s["grader"]) == (3, 6, "math500")
    assert set(s["breakdown"]) == {"subject", "level"}
    assert MlflowClient(uri).get_run(_run_id(uri)).data.metrics["total"] == 6


def test_cli_vision_benchmark_without_images_fails_clearly(tiny_model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run_cli(["--model", str(tiny_model), "--benchmark", "mathvista", "--limit", "2",
                   "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mathvista" in err and "--dataset" in err


# --------------------------------------------------------------------------- the eval stage


def test_eval_stage_on_benchmark_quarantines_items_without_images(tiny_model: Path, tmp_path: Path) -> None:
    """MATH-Vision test ids 1-3 have no shipped image: quarantined, kept in the denominator as wrong."""
    from r1v.eval.corpus import run_eval
    from r1v.workflow import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "stage", tmp_path / "artifacts")
    run_id = tracking.start_run(uri, exp, "eval")
    c = EvalConfig(model=str(tiny_model), benchmark="mathv", samples=2, limit=6,
                   sampling={"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8})
    stage_dir = tmp_path / "stage"
    res = run_eval(c, stage_dir, tracking.RunLogger(uri, run_id))

    assert Path(res["predictions"]).parent == stage_dir and Path(res["summary"]).exists()
    preds = Path(res["predictions"]).read_text().splitlines()
    assert len(preds) == 3 * 2
    quarantine = [json.loads(x) for x in (stage_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("1", "missing_image"), ("2", "missing_image"),
                                                            ("3", "missing_image")]
    s = json.loads(Path(res["summary"]).read_text())
    assert (s["items"], s["graded_items"], s["quarantined"], s["total"]) == (6, 3, 3, 12)
    assert s["quarantine_reasons"] == {"missing_image": 3}
    assert s["verdict_reasons"]["quarantined"] == 6
    verdicts = [json.loads(x) for x in (stage_dir / "verdicts.jsonl").read_text().splitlines()]
    assert all(not v["correct"] for v in verdicts if v["id"] in {"1", "2", "3"})

    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert {"pass_at_1", "pass_at_1_std", "quarantined", "sample_accuracy"} <= set(metrics)
    assert metrics["quarantined"] == 3
