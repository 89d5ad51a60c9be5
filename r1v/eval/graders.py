"""Graders, one per benchmark, registered by name.

A grader knows where its gold answers live (:meth:`Grader.load_gold`), how to judge one response
(:meth:`Grader.judge`, returning correctness and the extracted answer), and which breakdown keys it reports.
Graders whose judgement may run SymPy set ``bounded = True`` and are run in the time-bounded process pool;
MMMU sets ``bounded = False`` because its seeded random fallback must be drawn in file order in one process.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from r1v.core.registry import Registry
from r1v.eval.items import BenchItem
from r1v.eval.loaders import load_aime24, load_aime25, load_math500, load_mathv, load_mathvista, load_mmmu
from r1v.eval.mathv import grade_mathv
from r1v.eval.mathvista import extract_answer as mathvista_extract
from r1v.eval.mathvista import grade_mathvista
from r1v.eval.mmmu import (
    MMMU_SEED,
    SUBJECT_DOMAIN,
    eval_multi_choice,
    eval_open,
    parse_multi_choice_response,
    parse_open_response,
    subject_of,
)
from r1v.eval.predictions import Prediction
from r1v.grading.extract import final_answer, strip_think
from r1v.grading.math_equal import grade_math_answer

GRADERS: Registry[Grader] = Registry("benchmark grader")


def register(cls: type[Grader]) -> type[Grader]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    GRADERS.register(cls.name)(cls())
    return cls


def get_grader(name: str) -> Grader:
    """The grader registered as ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    return GRADERS.get(name)


class Grader(ABC):
    """Judges responses for one benchmark."""

    name: ClassVar[str]
    bounded: ClassVar[bool] = True
    gold_from_predictions: ClassVar[bool] = False

    @abstractmethod
    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        """Gold items by id."""

    @abstractmethod
    def judge(self, item: BenchItem, pred: Prediction, rng: random.Random) -> tuple[bool, str | None]:
        """(correct, extracted answer) for one response."""

    def check(self, item: BenchItem, pred: Prediction) -> str | None:
        """A problem that makes ``pred`` ungradable (reported before any grading), or None."""
        return None

    def new_rng(self) -> random.Random:
        """The random stream handed to :meth:`judge` for one in-process grading run."""
        return random.Random(0)


@register
class Math500Grader(Grader):
    """MATH-500: last boxed answer, LaTeX normalisation, numeric and symbolic equality."""

    name = "math500"

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        return {it.id: it for it in load_math500(root)}

    def judge(self, item: BenchItem, pred: Prediction, rng: random.Random) -> tuple[bool, str | None]:
        return grade_math_answer(pred.response, str(item.answer))


@register
class FreeMathGrader(Math500Grader):
    """Any free-form math set whose prediction lines carry their own gold ``answer`` (MATH-500 rules)."""

    name = "math"
    gold_from_predictions = True

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        return {}

    def check(self, item: BenchItem, pred: Prediction) -> str | None:
        answer = pred.extra.get("answer")
        if answer is None or isinstance(answer, (dict, list, bool)):
            return "missing field 'answer' (needed by --benchmark math)"
        return None


@register
class Aime24Grader(Math500Grader):
    """AIME 2024: as MATH-500, against the integer gold (``025`` is ``25``)."""

    name = "aime24"

    def judge(self, item: BenchItem, pred: Prediction, rng: random.Random) -> tuple[bool, str | None]:
        return grade_math_answer(pred.response, str(item.answer), integer=True)

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        return {it.id: it for it in load_aime24(root)}


@register
class Aime25Grader(Aime24Grader):
    """AIME 2025 (ids are line indices 0-29)."""

    name = "aime25"

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        return {it.id: it for it in load_aime25(root)}


@register
class MathVistaGrader(Grader):
    """MathVista testmini; grades a published ``extraction`` as is, else extracts from the response."""

    name = "mathvista"
    bounded = False

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        return {it.id: it for it in load_mathvista(root)}

    def judge(self, item: BenchItem, pred: Prediction, rng: random.Random) -> tuple[bool, str | None]:
        m = item.meta
        if "extraction" in pred.extra:
            extraction = pred.extra["extraction"]
        else:
            extraction = mathvista_extract(pred.response, item.choices, m["question_type"], m["answer_type"])
        return grade_mathvista(
            extraction, item.answer, item.choices, m["question_type"], m["answer_type"], m["precision"]
        )


@register
class MMMUGrader(Grader):
    """MMMU validation: official multiple-choice / open parsing with the seed-42 random fallback."""

    name = "mmmu"
    bounded = False

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        path = root / "mmmu" / "answer_dict_val.json"
        if not path.exists():
            raise FileNotFoundError(f"MMMU answers not found at {path} (set --data-root or $R1V_BENCHMARKS)")
        options = {it.id: it.choices for it in load_mmmu(dataset)} if dataset is not None else {}
        gold = {}
        for item_id, rec in json.loads(path.read_text(encoding="utf-8")).items():
            subject = subject_of(item_id)
            gold[item_id] = BenchItem(
                id=item_id,
                question="",
                answer=rec["ground_truth"],
                choices=options.get(item_id),
                category={"domain": SUBJECT_DOMAIN.get(subject, "?"), "subject": subject},
                meta={"question_type": rec["question_type"]},
            )
        return gold

    @staticmethod
    def _choices(item: BenchItem, pred: Prediction) -> tuple[list[str], dict[str, str]] | None:
        if "all_choices" in pred.extra and "index2ans" in pred.extra:
            return list(pred.extra["all_choices"]), dict(pred.extra["index2ans"])
        options = pred.extra.get("options") or item.choices
        if not options:
            return None
        letters = [chr(ord("A") + i) for i in range(len(options))]
        return letters, dict(zip(letters, map(str, options), strict=True))

    def check(self, item: BenchItem, pred: Prediction) -> str | None:
        mc = item.meta["question_type"] == "multiple-choice"
        if mc and not pred.extra.get("parsed") and self._choices(item, pred) is None:
            return (
                "multiple-choice item needs its options: add 'options' to the line or pass --dataset "
                "with the MMMU validation Parquet files"
            )
        return None

    def judge(self, item: BenchItem, pred: Prediction, rng: random.Random) -> tuple[bool, str | None]:
        if pred.extra.get("parsed"):  # total_val_output.json: already parsed upstream
            if item.meta["question_type"] == "multiple-choice":
                return eval_multi_choice(item.answer, pred.response), pred.response
            return eval_open(item.answer, parse_open_response(pred.response)), pred.response
        boxed = final_answer(pred.response)
        response = boxed if boxed is not None else strip_think(pred.response)
        if item.meta["question_type"] == "multiple-choice":
            choices = self._choices(item, pred)
            assert choices is not None  # guaranteed by check()
            letter = parse_multi_choice_response(response, choices[0], choices[1], rng)
            return eval_multi_choice(item.answer, letter), letter
        parsed = parse_open_response(response)
        return eval_open(item.answer, parsed), json.dumps(parsed)

    def new_rng(self) -> random.Random:
        """The official parser seeds Python's ``random`` with 42 once per run."""
        return random.Random(MMMU_SEED)


@register
class MathVisionGrader(Grader):
    """MATH-Vision (test and testmini ids): official re-extraction and ``is_equal``."""

    name = "mathv"

    def load_gold(self, root: Path, dataset: Path | None = None) -> dict[str, BenchItem]:
        return {it.id: it for it in load_mathv(root, "test")}

    def judge(self, item: BenchItem, pred: Prediction, rng: random.Random) -> tuple[bool, str | None]:
        return grade_mathv(strip_think(pred.response), str(item.answer), item.choices or [])


def gold_from_line(pred: Prediction) -> BenchItem:
    """The gold item that a ``--benchmark math`` line carries itself."""
    cat = {k: str(pred.extra[k]) for k in ("subject", "level", "source") if k in pred.extra}
    return BenchItem(
        id=pred.id,
        question=str(pred.extra.get("problem", "")),
        answer=str(pred.extra["answer"]),
        category=cat,
    )


def categories_of(item: BenchItem) -> dict[str, Any]:
    """Breakdown keys of an item (drops empty values)."""
    return {k: v for k, v in item.category.items() if v not in (None, "", [])}
