"""MATH-Vision scoring, after mathllm/MATH-V ``evaluation/evaluate.py`` and ``utils.py``.

The official scorer re-extracts an answer from the raw response (a few "the answer is" phrasings, option
letters, the last ``\\boxed{}``), normalises it with its own ``_strip_string``, and judges it equal to the
gold letter or the gold option text by lower-cased string equality, by tuple evaluation, or by evaluating both
sides numerically (``latex2sympy`` then Python ``eval``) rounded to 2 decimals.  :func:`latex_value`
reproduces what that numeric path accepts and rejects (for example it rejects bare letters and ``\\ln``, and
reads ``\\log`` as base 10), using our own converter instead of ``latex2sympy2``.
"""

from __future__ import annotations

import math
import re

import sympy

from r1v.eval.latex_sym import LatexError, parse_latex_expr

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


_UNSUPPORTED = re.compile(
    r"\\(?:ln|text|mathrm|infty|circ|sec|csc|cot|exp|!)(?![a-zA-Z])|°|\||(?<!\\)%|\s\\%"
)


def _fracs_fully_braced(s: str) -> bool:
    """latex2sympy rejects ``\\frac12`` and ``\\frac{1}2``: both arguments must be brace groups."""
    for m in re.finditer(r"\\[dt]?frac", s):
        i = m.end()
        for _ in range(2):
            if i >= len(s) or s[i] != "{":
                return False
            depth = 0
            while i < len(s):
                depth += {"{": 1, "}": -1}.get(s[i], 0)
                i += 1
                if depth == 0:
                    break
    return True


def latex_value(s: str) -> float | None:
    """The number ``eval(str(latex2sympy(s)))`` would give, or None where that upstream path fails.

    The rules below mirror latex2sympy2's observed behaviour on answer strings: ``\\%`` divides by 100 (but
    not after a space), commas before three digits are thousands separators and other commas make a list,
    ``e`` only means Euler's number in ``e^x``, bare letters and a few functions fail in ``eval``.
    """
    s = s.strip()
    if not s or _UNSUPPORTED.search(s) or re.search(r"\\sqrt(?![\s{\[])", s) or not _fracs_fully_braced(s):
        return None
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    if "," in s:
        return None
    s = re.sub(r"(?<![a-zA-Z\\])e(?=\^)", "(2.718281828459045)", s)
    if re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", s)):
        return None
    s = s.replace("\\%", "\\cdot\\frac{1}{100}").replace(":", "/")
    s = re.sub(r"\\log\s*(\{[^{}]*\}|\d+(?:\.\d+)?)", r"\\frac{\\ln\1}{\\ln{10}}", s)
    if "\\log" in s:
        return None
    try:
        expr = parse_latex_expr(s.replace("\\ln", "\\log"))
        if isinstance(expr, tuple) or expr.free_symbols or expr.has(sympy.I, sympy.oo, sympy.zoo, sympy.nan):
            return None
        value = complex(sympy.N(expr))
    except (LatexError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value.real if value.imag == 0 and math.isfinite(value.real) else None


def _eval_tuple(s: str) -> str:
    parts = s[1:-1].split(",")
    if len(s) < 2 or len(parts) <= 1 or (s[0], s[-1]) not in (("(", ")"), ("[", "]")):
        return s
    out = []
    for sub in parts:
        if "infty" in sub or sub in ("a", "-a"):
            out.append(sub)
            continue
        v = latex_value(sub)
        if v is None:
            return s
        out.append(str(round(v, 2)))
    return s[0] + ",".join(out) + s[-1]


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
    a, g = latex_value(asw), latex_value(gt)
    return a is not None and g is not None and round(g, 2) == round(a, 2)


def grade_mathv(response: str, answer: str, options: list[str]) -> tuple[bool, str]:
    """Official MATH-V judgement: equal to the gold letter, or to the gold option's text."""
    model_answer = extract_answer(response)
    value = options[ord(answer) - ord("A")] if options else ""
    return is_equal(answer, model_answer) or is_equal(value, model_answer), model_answer
