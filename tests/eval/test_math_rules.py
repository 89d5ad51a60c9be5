"""MATH-500 / AIME equivalence, reasoning-output extraction, and the gold-against-itself checks."""

from __future__ import annotations

import pytest

from r1v.eval.grading import grade_predictions
from r1v.eval.loaders import load_aime24, load_aime25, load_math500
from r1v.eval.predictions import Prediction
from r1v.grading.extract import final_answer, last_boxed, strip_think
from r1v.grading.math_equal import grade_math_answer, math_equal, strip_string


@pytest.mark.parametrize(
    ("loader", "benchmark", "n"),
    [(load_math500, "math500", 500), (load_aime24, "aime24", 30), (load_aime25, "aime25", 30)],
)
def test_gold_answers_grade_equal_to_themselves_boxed(bench_root, loader, benchmark, n):
    items = loader(bench_root)
    preds = [Prediction(id=it.id, response=f"Answer: \\boxed{{{it.answer}}}") for it in items]
    report = grade_predictions(benchmark, preds, bench_root, workers=2)
    assert (report.correct, report.total) == (n, n)


def test_aime_raw_gold_with_leading_zeros(bench_root):
    import json

    raw = [json.loads(x) for x in (bench_root / "aime24/test.jsonl").read_text().splitlines()]
    assert any(r["answer"].startswith("0") for r in raw)
    for r in raw:
        assert grade_math_answer(f"\\boxed{{{r['answer']}}}", str(int(r["answer"])), integer=True)[0]
    assert not grade_math_answer("\\boxed{25.5}", "25", integer=True)[0]
    assert not grade_math_answer("\\boxed{26}", "25", integer=True)[0]


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("(x+1)^2", "x^2+2x+1"),
        (r"(-\infty, 3]", r"(-\infty,3]"),
        ("10\\%", "0.1"),
        ("1,000", "1000"),
        ("x=5", "5"),
        (r"\text{Evelyn}", "Evelyn"),
        ("6 - 5i", "6-5i"),
        (r"90^\circ", "90"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2.0\end{pmatrix}"),
        (r"\frac{14}{3}", "4.66667"),
    ],
)
def test_equivalent_answers(pred, gold):
    assert math_equal(strip_string(pred), strip_string(gold))


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("3", "4"),
        ("[1,2)", "(1,2)"),
        ("1,2", "12"),
        ("x^2", "x^3"),
        (r"\sqrt{2}", "1.5"),
        ("", "0"),
        (r"\begin{pmatrix}1\\2\end{pmatrix}+x", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        ("52_8+x-x+2", "52_8"),  # latex2sympy alone reads both as 52 (it drops what its grammar cannot read)
        ("42)(43", "42"),
        (r"\frac{1}{3}", r"2\sqrt{3}"),
    ],
)
def test_different_answers(pred, gold):
    assert not math_equal(strip_string(pred), strip_string(gold))


def test_latex2sympy_prefix_reading_is_kept_for_mathv_and_refused_for_math():
    from r1v.grading.latex_sym import LatexError, latex2sympy, parses_completely

    assert str(latex2sympy("52_8+x-x+2")) == "52" and str(latex2sympy("\\frac{7}{32}}.x")) == "7/32"
    assert not parses_completely("52_8+x-x+2") and not parses_completely("\\frac{7}{32}}.x")
    assert parses_completely("\\dfrac{1}{2}") and parses_completely("x=5") and parses_completely("1,2")
    with pytest.raises(LatexError, match="trailing text"):
        latex2sympy("52_8", strict=True)
    assert str(latex2sympy("\\dfrac{\\sqrt{3}}{2}", strict=True)) == "sqrt(3)/2"


def test_reasoning_output_think_is_ignored_and_answer_line_wins():
    text = "<think>maybe \\boxed{7}</think>So the area is 12.\nAnswer: \\boxed{\\frac{1}{2}}"
    assert strip_think(text).startswith("So the area")
    assert final_answer(text) == "\\frac{1}{2}"
    assert grade_math_answer(text, "0.5")[0]
    assert not grade_math_answer("<think>\\boxed{7}</think>I am not sure.", "7")[0]
    assert final_answer("<think>still thinking \\boxed{3}") is None
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"


def test_unboxed_fallbacks():
    assert grade_math_answer("Thus the final answer is $\\frac{3}{4}$.", "\\frac34") == (True, "\\frac{3}{4}")
    assert grade_math_answer("the answer is \\$36", "36")[0]
    assert grade_math_answer("We get 3 apples, then 41", "41")[0]
    assert grade_math_answer("no digits", "41") == (False, None)
