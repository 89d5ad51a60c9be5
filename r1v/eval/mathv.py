"""MATH-Vision scoring, after mathllm/MATH-V ``evaluation/evaluate.py`` and ``utils.py``.

The official scorer re-extracts an answer from the raw response (a few "the answer is" phrasings, option
letters, the last ``\\boxed{}``), normalises it with its own ``_strip_string``, and judges it equal to the
gold letter or the gold option text by lower-cased string equality, by tuple evaluation, or by evaluating both
sides numerically (``latex2sympy`` then Python ``eval``) rounded to 2 decimals.  :func:`latex_value` is that
numeric path, through the same library (:mod:`r1v.grading.latex_sym`), so it accepts and rejects what upstream
does: bare letters, ``e`` and ``\\ln`` fail in ``eval``; ``\\log 100`` is base 10; trailing text after a
complete expression is ignored.
"""

from __future__ import annotations

import re
from typing import Any

from r1v.grading.latex_sym import eval_printed, latex2sympy

_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{"):
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b, rest = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for p in pieces[1:]:
        out += "\\sqrt{" + p[0] + "}" + p[1:] if p and p[0] != "{" else "\\sqrt" + p
    return out


def _strip_string(s: str) -> str:
    """MATH-V's ``_strip_string`` (note: its ``\\frac`` fix runs only when ``sqrt`` occurs, as upstream)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def find_math_answer(s: str) -> str:
    """MATH-V's ``find_math_answer``: greedy last ``oxed{...}``, cut at a stray ``}``, strip units, LaTeX."""
    s = s.lower().replace("{}", "")
    found = re.findall(r"oxed{(.*)}", s, flags=re.S)
    ans = found[-1] if found else s
    close, open_ = ans.find("}"), ans.find("{")
    if close != -1 and (open_ == -1 or close < open_):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    ans = ans.replace(" ", "").replace("\\,", "").replace("∞", "\\infty")
    ans = ans.replace("+\\infty", "\\infty").replace("\\\\", "\\").replace("\n", "")
    ans = ans.replace("\\text", "").replace("\\mbox", "").replace("bmatrix", "pmatrix")
    ans = ans.replace("\\left", "").replace("\\right", "").replace("^{\\circ}", "")
    ans = ans.replace("^\\circ", "").replace("{m}^3", "").replace("m^3", "")
    ans = ans.replace("{units}", "").replace("units", "").replace("{km}", "").replace("km", "")
    return _strip_string(ans)


def extract_answer(response: str) -> str:
    """The official re-extraction (``evaluate(..., regen_answer=True)``) applied to one raw response."""
    ans = response.strip()
    for c in "ABCDE":
        if (
            ans.endswith(f" {c}.")
            or ans.endswith(f" ({c}).")
            or ans.startswith(f"{c}\n")
            or ans.startswith(f"({c})\n")
            or ans.startswith(f"({c}) {c}\n")
        ):
            ans = c
    if _is_number(ans.split("is ")[-1].rstrip(".")):
        ans = ans.split("is ")[-1].rstrip(".")
    if "oxed{" not in ans:
        for flag in _FLAGS:
            for variant in (flag, flag.replace("the", "The")):
                raw = ans
                ans = ans.split(variant)[-1].strip()
                if variant in raw:
                    ans = ans.split("\n")[0].split(". ")[0]
    elif ans.count("oxed{") > 1:
        ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = find_math_answer(ans)
    for letter in "abcde":
        ans = ans.replace(f"({letter})", letter).replace(f"{{{letter}}}", letter)
    return ans.rstrip(".").lstrip(":").strip()


def latex_value(s: str) -> Any:
    """``eval(str(latex2sympy(s)))``, the numeric reading MATH-V's ``is_equal`` compares; raises where it fails.

    The result is whatever that evaluation gives (usually a number; a list for ``1,2``), exactly as upstream,
    so that ``round(..., 2)`` fails or succeeds on the same inputs.
    """
    return eval_printed(latex2sympy(s))


def _eval_tuple(s: str) -> str:
    """MATH-V's ``eval_tuple``: ``(a,b)`` / ``[a,b]`` with each element evaluated and rounded to 2 decimals."""
    parts = s[1:-1].split(",")
    try:
        if len(parts) > 1 and (s[0], s[-1]) in (("(", ")"), ("[", "]")):
            inner = ",".join(
                str(round(latex_value(sub), 2)) if "infty" not in sub and sub not in ("a", "-a") else sub
                for sub in parts
            )
            return s[0] + inner + s[-1]
    except Exception:  # upstream: any failure leaves the string as it was
        return s
    return s


def is_equal(asw: str, gt: str) -> bool:
    """MATH-V ``is_equal``: lower-cased strings, evaluated tuples, or numeric values rounded to 2 decimals."""
    asw, gt = asw.lower(), gt.lower()
    if not asw.replace(" ", "") or not gt.replace(" ", ""):
        return False
    if gt.strip() == asw.strip():
        return True
    asw, gt = _eval_tuple(asw), _eval_tuple(gt)
    if gt == asw:
        return True
    try:
        return bool(round(latex_value(gt), 2) == round(latex_value(asw), 2))
    except Exception:  # upstream: any failure (parse, NameError in eval, round of a list) means not equal
        return False


def grade_mathv(response: str, answer: str, options: list[str]) -> tuple[bool, str]:
    """Official MATH-V judgement: equal to the gold letter, or to the gold option's text."""
    model_answer = extract_answer(response)
    value = options[ord(answer) - ord("A")] if options else ""
    return is_equal(answer, model_answer) or is_equal(value, model_answer), model_answer
