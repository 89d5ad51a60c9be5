"""Loaders: shipped text benchmarks, MATH-Vision images, and MathVista/MMMU official Parquet fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1v.eval.grading import grade_predictions
from r1v.eval.loaders import LOADERS, load_benchmark, load_mathvista, load_mmmu

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_text_benchmarks_and_mathv(bench_root):
    sizes = {
        "math500": 500,
        "aime24": 30,
        "aime25": 30,
        "mathvista": 1000,
        "mathv": 3040,
        "mathv-testmini": 304,
    }
    for name, n in sizes.items():
        items = load_benchmark(name, bench_root)
        assert len(items) == n and len({it.id for it in items}) == n, name
    aime25 = load_benchmark("aime25", bench_root)
    assert "\\boxed" not in aime25[0].question and "\\boxed" in aime25[0].query and aime25[0].answer == "70"
    mini = load_benchmark("mathv-testmini", bench_root)
    assert all(it.images and it.images[0][:2] == b"\xff\xd8" for it in mini)  # real JPEG bytes
    mc = next(it for it in mini if it.choices)
    assert mc.answer in "ABCDE" and mc.category.keys() == {"subject", "level"}
    assert load_benchmark("mathv", bench_root)[0].images is None
    vista = load_benchmark("mathvista", bench_root)
    assert vista[0].query.startswith("Hint:") and vista[0].images is None and "skills" in vista[0].category
    with pytest.raises(ValueError, match="Parquet"):
        load_benchmark("mmmu", bench_root)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gsm8k", bench_root)
    assert set(LOADERS) >= {"math500", "aime24", "aime25", "mathvista", "mmmu", "mathv"}


def _mathvista_parquet(path: Path) -> None:
    meta = pa.struct(
        [
            ("language", pa.string()),
            ("source", pa.string()),
            ("category", pa.string()),
            ("task", pa.string()),
            ("context", pa.string()),
            ("grade", pa.string()),
            ("skills", pa.list_(pa.string())),
        ]
    )
    rows = {
        "pid": ["1", "2"],
        "question": ["How long is it?", "Which shape?"],
        "image": ["images/1.jpg", "images/2.jpg"],
        "decoded_image": [{"bytes": PNG, "path": "1.jpg"}, {"bytes": PNG + b"2", "path": "2.jpg"}],
        "choices": [None, ["circle", "square"]],
        "unit": [None, None],
        "precision": [1.0, None],
        "answer": ["1.2", "square"],
        "question_type": ["free_form", "multi_choice"],
        "answer_type": ["float", "text"],
        "metadata": [
            {
                "language": "english",
                "source": "S",
                "category": "math-targeted-vqa",
                "task": "t",
                "context": "c",
                "grade": "college",
                "skills": ["a", "b"],
            }
        ]
        * 2,
        "query": ["Hint: float. Question: How long is it?", "Hint: choose. Question: Which shape?"],
    }
    schema = pa.schema(
        [
            ("pid", pa.string()),
            ("question", pa.string()),
            ("image", pa.string()),
            ("decoded_image", IMAGE),
            ("choices", pa.list_(pa.string())),
            ("unit", pa.string()),
            ("precision", pa.float64()),
            ("answer", pa.string()),
            ("question_type", pa.string()),
            ("answer_type", pa.string()),
            ("metadata", meta),
            ("query", pa.string()),
        ]
    )
    pq.write_table(pa.table(rows, schema=schema), path)


def test_mathvista_parquet_loader(tmp_path, bench_root):
    path = tmp_path / "testmini-00000-of-00001.parquet"
    _mathvista_parquet(path)
    items = load_mathvista(bench_root, dataset=tmp_path)
    assert [it.id for it in items] == ["1", "2"]
    assert items[0].images == [PNG] and items[1].images == [PNG + b"2"]
    assert items[1].choices == ["circle", "square"] and items[1].answer == "square"
    assert items[0].query.startswith("Hint") and items[0].category["skills"] == ["a", "b"]
    assert items[0].meta["precision"] == 1.0


def _mmmu_parquet(path: Path) -> None:
    path.mkdir(parents=True)
    cols = {
        "id": ["validation_Accounting_1", "validation_Accounting_2"],
        "question": ["<image 1> What is the cost?", "Compute the rate."],
        "options": ["['$6', '$7', '$8', '$9']", "[]"],
        "explanation": ["", ""],
        "image_1": [{"bytes": PNG, "path": "a.png"}, {"bytes": PNG + b"b", "path": "b.png"}],
        "image_2": [None, {"bytes": PNG + b"c", "path": "c.png"}],
        "img_type": ["['Tables']", "['Plots']"],
        "answer": ["B", "1.06"],
        "topic_difficulty": ["Easy", "Hard"],
        "question_type": ["multiple-choice", "open"],
        "subfield": ["Finance", "Finance"],
    }
    cols.update({f"image_{k}": [None, None] for k in range(3, 8)})
    schema = pa.schema([(k, IMAGE if k.startswith("image_") else pa.string()) for k in cols])
    pq.write_table(pa.table(cols, schema=schema), path / "validation-00000-of-00001.parquet")
    pq.write_table(pa.table({k: [v[0]] for k, v in cols.items()}, schema=schema), path / "dev-00000.parquet")


def test_mmmu_parquet_loader_and_grading_with_its_options(tmp_path, bench_root):
    data = tmp_path / "MMMU" / "Accounting"
    _mmmu_parquet(data)
    items = load_mmmu(tmp_path / "MMMU")
    assert [it.id for it in items] == ["validation_Accounting_1", "validation_Accounting_2"]
    first, second = items
    assert first.choices == ["$6", "$7", "$8", "$9"] and first.images == [PNG]
    assert second.choices is None and second.images == [PNG + b"b", PNG + b"c"]
    assert first.category == {"domain": "Business", "subject": "Accounting"}
    assert load_benchmark("mmmu", bench_root, dataset=tmp_path / "MMMU")[0].question.startswith("<image 1>")

    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"id": "validation_Accounting_1", "response": "<think>maybe (A)</think>Answer: \\boxed{B}"},
                {
                    "id": "validation_Accounting_1",
                    "response": "I think the cost is $7 in total here.",
                    "sample": 1,
                },
            ]
        )
        + "\n"
    )
    report = grade_predictions("mmmu", preds, bench_root, dataset=tmp_path / "MMMU")
    assert [(v.correct, v.extracted) for v in report.verdicts] == [(True, "B"), (True, "B")]
