"""Benchmark loaders: MATH-500, AIME 2024/2025, MathVista testmini, MMMU validation, MATH-Vision.

Text benchmarks and annotations are read from the shared data root.  MathVista images and MMMU questions are
not shipped, so those loaders read the benchmarks' official Parquet releases from a path the user gives
(a file or a folder of ``*.parquet``); images there are ``{bytes, path}`` structs.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from r1v.eval.items import BenchItem
from r1v.eval.mmmu import SUBJECT_DOMAIN, subject_of

_AIME25_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path} (set --data-root or $R1V_BENCHMARKS)")
    return path


def load_math500(root: Path) -> list[BenchItem]:
    """MATH-500: id is the ``unique_id`` (``test/algebra/1072.json``)."""
    path = _need(root / "math500" / "test.jsonl", "MATH-500")
    return [
        BenchItem(
            id=r["unique_id"],
            question=r["problem"],
            answer=r["answer"],
            category={"subject": r["subject"], "level": str(r["level"])},
            meta={"solution": r["solution"]},
        )
        for r in _jsonl(path)
    ]


def load_aime24(root: Path) -> list[BenchItem]:
    """AIME 2024: gold answers are integers (``"025"`` -> ``"25"``)."""
    path = _need(root / "aime24" / "test.jsonl", "AIME 2024")
    return [
        BenchItem(
            id=str(r["id"]),
            question=r["problem"],
            answer=str(int(r["answer"])),
            category={"contest": "2024 " + ("II" if "_II_" in r.get("url", "") else "I")},
            meta={"url": r.get("url"), "solution": r.get("solution")},
        )
        for r in _jsonl(path)
    ]


def load_aime25(root: Path) -> list[BenchItem]:
    """AIME 2025: no ids upstream, so the id is the line index; problems 0-14 are AIME I, 15-29 AIME II."""
    path = _need(root / "aime25" / "test.jsonl", "AIME 2025")
    items = []
    for i, r in enumerate(_jsonl(path)):
        question = r["prompt"].removesuffix(_AIME25_SUFFIX)
        items.append(
            BenchItem(
                id=str(i),
                question=question,
                answer=str(int(r["answer"])),
                query=r["prompt"],
                category={"contest": "2025 " + ("I" if i < 15 else "II")},
            )
        )
    return items


def _parquet_rows(path: Path, pattern: str = "*.parquet") -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    files = sorted(path.rglob(pattern)) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no {pattern} files under {path}")
    for f in files:
        yield from pq.read_table(f).to_pylist()


def _image_bytes(value: Any) -> bytes | None:
    """An image cell: a ``{bytes, path}`` struct (HF datasets' Image feature) or raw bytes."""
    if isinstance(value, dict):
        return value.get("bytes")
    return value if isinstance(value, bytes) else None


def _mathvista_category(ann: dict[str, Any]) -> dict[str, Any]:
    meta = ann.get("metadata") or {}
    cat = {k: ann.get(k) for k in ("question_type", "answer_type")}
    cat.update(
        {k: meta.get(k) for k in ("language", "source", "category", "task", "context", "grade", "skills")}
    )
    return cat


def _mathvista_item(pid: str, ann: dict[str, Any], query: str | None, image: bytes | None) -> BenchItem:
    return BenchItem(
        id=pid,
        question=ann["question"],
        answer=ann["answer"],
        choices=ann.get("choices"),
        images=[image] if image else None,
        query=query,
        category=_mathvista_category(ann),
        meta={k: ann.get(k) for k in ("question_type", "answer_type", "precision", "unit", "image")},
    )


def load_mathvista(root: Path, dataset: Path | None = None) -> list[BenchItem]:
    """MathVista testmini from the shipped annotations; images from the official
    Parquet when ``dataset`` is given.

    The Parquet release (columns ``pid``, ``question``, ``decoded_image``, ``choices``, ``precision``,
    ``answer``, ``question_type``, ``answer_type``, ``metadata``, ``query``...) is self-contained, so with it
    the rows come from the Parquet and the shipped annotations are not needed.
    """
    if dataset is not None:
        items = []
        for r in _parquet_rows(Path(dataset)):
            image = _image_bytes(r.get("decoded_image"))
            items.append(_mathvista_item(str(r["pid"]), r, r.get("query"), image))
        return items
    anns = json.loads(_need(root / "mathvista" / "testmini.json", "MathVista").read_text(encoding="utf-8"))
    query_path = root / "mathvista" / "query.json"
    queries = json.loads(query_path.read_text(encoding="utf-8")) if query_path.exists() else {}
    return [_mathvista_item(pid, ann, queries.get(pid), None) for pid, ann in anns.items()]


def _mmmu_options(value: Any) -> list[str]:
    """MMMU stores options as the text of a Python list (``"['1', '2']"``)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if not value:
        return []
    parsed = ast.literal_eval(value)
    return [str(v) for v in parsed]


def load_mmmu(dataset: Path) -> list[BenchItem]:
    """MMMU validation from the official Parquet files (``{Subject}/validation-*.parquet``).

    Each row has ``id``, ``question``, ``options``, ``answer``, ``question_type``, ``image_1``..``image_7``;
    the question text refers to images as ``<image 1>``.
    """
    path = Path(dataset)
    pattern = (
        "validation*.parquet" if path.is_dir() and any(path.rglob("validation*.parquet")) else "*.parquet"
    )
    items = []
    for r in _parquet_rows(path, pattern):
        if not str(r["id"]).startswith("validation_"):
            continue
        images = [b for k in range(1, 8) if (b := _image_bytes(r.get(f"image_{k}")))]
        subject = subject_of(r["id"])
        options = _mmmu_options(r.get("options"))
        items.append(
            BenchItem(
                id=r["id"],
                question=r["question"],
                answer=r["answer"],
                choices=options or None,
                images=images or None,
                category={"domain": SUBJECT_DOMAIN.get(subject, "?"), "subject": subject},
                meta={
                    "question_type": r.get("question_type"),
                    "img_type": r.get("img_type"),
                    "topic_difficulty": r.get("topic_difficulty"),
                    "subfield": r.get("subfield"),
                },
            )
        )
    return items


def load_mathv(root: Path, split: str = "testmini") -> list[BenchItem]:
    """MATH-Vision: ``testmini`` with its 304 images read as bytes, ``test`` (3040) without images."""
    if split not in ("testmini", "test"):
        raise ValueError(f"MATH-Vision split must be 'testmini' or 'test', not {split!r}")
    base = root / "mathv"
    items = []
    for r in _jsonl(_need(base / f"{split}.jsonl", f"MATH-Vision {split}")):
        images = None
        if split == "testmini" and r.get("image"):
            images = [_need(base / r["image"], "MATH-Vision image").read_bytes()]
        items.append(
            BenchItem(
                id=str(r["id"]),
                question=r["question"],
                answer=str(r["answer"]),
                choices=r["options"] or None,
                images=images,
                category={"subject": r["subject"], "level": str(r["level"])},
                meta={"image": r.get("image"), "solution": r.get("solution")},
            )
        )
    return items


LOADERS: dict[str, Callable[..., list[BenchItem]]] = {
    "math500": load_math500,
    "aime24": load_aime24,
    "aime25": load_aime25,
    "mathvista": load_mathvista,
    "mmmu": lambda root, dataset=None: load_mmmu(_require_dataset(dataset, "MMMU")),
    "mathv": lambda root, dataset=None: load_mathv(root, "test"),
    "mathv-testmini": lambda root, dataset=None: load_mathv(root, "testmini"),
}


def _require_dataset(dataset: Path | None, name: str) -> Path:
    if dataset is None:
        raise ValueError(f"{name} questions are not shipped: pass the path of its official Parquet files")
    return Path(dataset)


def load_benchmark(name: str, root: Path, dataset: Path | None = None) -> list[BenchItem]:
    """Load benchmark ``name`` (see :data:`LOADERS`); ``dataset``: official Parquet where needed."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(LOADERS))}") from None
    if name in ("math500", "aime24", "aime25"):
        return loader(root)
    return loader(root, dataset=dataset)
