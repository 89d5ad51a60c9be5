"""Unit checks of the official rules: MathVista normalisation, MMMU parsing, MATH-V equality, pass@1."""

from __future__ import annotations

import random

import pytest

from r1v.eval.mathv import extract_answer, grade_mathv, is_equal, latex_value
from r1v.eval.mathvista import extract_answer as vista_extract
from r1v.eval.mathvista import levenshtein, normalize_extracted_answer
from r1v.eval.mmmu import eval_open, parse_multi_choice_response, parse_open_response
from r1v.eval.passk import pass_at_1


def test_mathvista_normalisation():
    choices = ["2", "4", "8"]
    assert normalize_extracted_answer("(B) 4", choices, "multi_choice", "text", None) == "4"
    assert normalize_extracted_answer("C", choices, "multi_choice", "text", None) == "8"
    assert normalize_extracted_answer("41", choices, "multi_choice", "text", None) == "4"  # nearest
    assert normalize_extracted_answer("", choices, "multi_choice", "text", None) == "2"  # tie -> first
    assert normalize_extracted_answer("3.0", None, "free_form", "integer", None) == "3"
    assert normalize_extracted_answer("1.26", None, "free_form", "float", 1) == "1.3"
    assert normalize_extracted_answer("abc", None, "free_form", "float", 2) is None
    assert normalize_extracted_answer([1, 2], None, "free_form", "list", None) == "[1, 2]"
    assert levenshtein("kitten", "sitting") == 3
    assert vista_extract("<think>\\boxed{A}</think>Answer: \\boxed{B}", ["x", "y"], "multi_choice", "text") == "B"
    assert vista_extract('The answer is "7".', None, "free_form", "integer") == "7"


def test_mmmu_multiple_choice_rules():
    letters = ["A", "B", "C", "D"]
    opts = {"A": "red apple", "B": "green pear", "C": "blue sky", "D": "black cat"}
    rng = random.Random(0)
    assert parse_multi_choice_response("(A) or maybe (C)", letters, opts, rng) == "C"  # last wins
    assert parse_multi_choice_response("I pick B.", letters, opts, rng) == "B"
    assert parse_multi_choice_response("the picture clearly shows a blue sky today", letters, opts, rng) == "C"
    fallback = [parse_multi_choice_response("no idea", letters, opts, random.Random(42)) for _ in range(3)]
    assert len(set(fallback)) == 1  # seeded: the same letter every run


def test_mmmu_open_rules():
    assert eval_open("1.06", parse_open_response("So the answer is 1.0600."))
    assert eval_open(["12", "twelve"], parse_open_response("There are twelve of them"))
    assert not eval_open("5", parse_open_response("The result is 15"))
    assert eval_open("Transformation", parse_open_response("The process is transformation."))


def test_mathv_rules():
    assert extract_answer("The answer is (C).") == "c"
    assert extract_answer("so we get \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert is_equal("0.5", "\\frac{1}{2}") and is_equal("(1,2)", "(1.0,2.0)")
    assert not is_equal("a", "b") and not is_equal("", "")
    with pytest.raises(NameError):  # latex2sympy gives E; MATH-V's eval namespace (math.*) has only `e`
        latex_value("e")
    with pytest.raises(NameError):
        latex_value("\\ln 2")  # log(2, E)
    assert latex_value("12,345") == 12345 and latex_value("1,2") == [1, 2]
    assert latex_value("\\log 100") == pytest.approx(2.0) and latex_value("\\tau") == pytest.approx(6.2832, abs=1e-4)
    assert is_equal("1", "1:1") and not is_equal("1,2", "12")


def test_mathv_trailing_text_after_the_closing_brace_graded_as_upstream():
    """The greedy ``oxed{(.*)}`` of MATH-V keeps text after the box; latex2sympy reads the longest valid prefix.

    MATH-V's own ``is_equal`` (latex2sympy2 1.9.1, antlr 4.7.2) says True for the exact and the 2-decimal gold
    and False for a gold that differs at 2 decimals; a home-made parser that rejected the trailing letters
    graded all three False.
    """
    response = "The probability is \\boxed{\\frac{7}{32}}. The answer is: \\frac{7}{32}"
    answer = extract_answer(response)
    assert answer == "\\frac{7}{32}}.theansweris:\\frac{7}{32"
    assert latex_value(answer) == pytest.approx(7 / 32)
    assert is_equal("\\frac{7}{32}", answer) and is_equal("0.22", answer) and not is_equal("0.2", answer)
    assert grade_mathv(response, "B", ["\\frac{1}{4}", "\\frac{7}{32}"]) == (True, answer)
    assert grade_mathv(response, "A", ["\\frac{1}{4}", "\\frac{7}{32}"]) == (False, answer)


def test_pass_at_1():
    assert pass_at_1([[True, False], [True, True]]) == pytest.approx((0.75, 0.3535533905932738))
    assert pass_at_1({0: [True, True, False, False]}) == (0.5, 0.0)
    with pytest.raises(ValueError):
        pass_at_1([])
    with pytest.raises(ValueError):
        pass_at_1([[True], []])
