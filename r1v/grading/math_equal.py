"""MATH-500 / AIME answer equivalence, after the Qwen2.5-Math and PRM800K graders.

Order of checks (cheapest first, as the official graders do): normalised strings, numbers (relative tolerance
1e-4, percentages allowed), tuples/intervals element by element (bracket kinds must agree), equations, then
SymPy on what ``latex2sympy2`` parses (Qwen's ``symbolic_equal``).  SymPy can take unbounded time on hostile
input (power towers), so callers run this inside the time-bounded pool of :mod:`r1v.grading.pool`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import sympy

from r1v.grading.extract import final_answer, strip_think
from r1v.grading.latex_sym import LatexError, latex2sympy

_TEXT_UNIT_AT_END = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[^{}]*\}$")


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}`` and ``\frac1{72}`` -> ``\frac{1}{72}`` (Hendrycks' MATH rule)."""
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{") or len(sub) < 2:
            out += sub
            continue
        a, b, rest = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def strip_string(s: str) -> str:
    """Normalise a LaTeX answer: the MATH/Qwen ``strip_string`` rules without the MathQA unit word list."""
    s = str(s).strip().replace("\n", "").rstrip(".").replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}")
    s = s.replace("bmatrix", "pmatrix").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    without_unit = _TEXT_UNIT_AT_END.sub("", s).strip()
    if without_unit and without_unit != s and re.search(r"[\d}]$", without_unit):
        s = without_unit
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{(.*?)\}", r"\1", s)
    for key in ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"):
        s = s.replace(key, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = re.sub(r"\binf\b", "\\\\infty", s)
    s = s.replace("\\mathbf", "")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    halves = s.split("=")
    if len(halves) == 2 and len(halves[0].strip()) <= 2:
        s = halves[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    return _fix_a_slash_b(s)


def _parse_number(s: str) -> float | None:
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d*)?%?", s):
        s = s.replace(",", "")
    try:
        return float(s)
    except ValueError:
        if s.endswith("%"):
            try:
                return float(s[:-1].rstrip("\\")) / 100
            except ValueError:
                return None
    return None


def numeric_equal(a: float, b: float) -> bool:
    """Relative tolerance 1e-4, as Qwen2.5-Math's ``numeric_equal`` (an absolute floor covers zero)."""
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12)


def _numbers_equal(pred: str, ref: str, include_percentage: bool = True) -> bool | None:
    """True/False when both are plain numbers (the reference may be read as a percentage), else None."""
    p, r = _parse_number(pred), _parse_number(ref)
    if p is None or r is None:
        return None
    return any(numeric_equal(p, cand) for cand in ((r, r / 100, r * 100) if include_percentage else (r,)))


def _split_top(s: str) -> list[str]:
    """Split on commas that are not nested inside brackets or braces."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _is_bracketed(s: str) -> bool:
    return len(s) >= 2 and s[0] in "([" and s[-1] in ")]"


def _parse(s: str) -> Any:
    """Qwen's ``_parse`` with its third parser only (see :mod:`r1v.grading.latex_sym` for why): ``latex2sympy`` on
    ``s`` with ``\\\\`` read as ``\\``, then on ``s``; the string itself when neither parses.

    Strict: the whole string must parse.  Qwen reaches the lenient ``latex2sympy`` only after SymPy's strict
    ``parse_latex`` and ``parse_expr`` failed; alone, its prefix reading would make ``52_8+x-x+2`` equal 52.
    """
    for text in (s.replace("\\\\", "\\"), s):
        try:
            return latex2sympy(text, strict=True)
        except LatexError:
            pass
    return s


def _real_constant(x: Any) -> float | None:
    """The value of a SymPy expression without free symbols when it is a finite real number, else None."""
    try:
        if not isinstance(x, sympy.Expr) or x.free_symbols:
            return None
        v = complex(sympy.N(x))
    except Exception:  # SymPy cannot evaluate it: leave it to the symbolic checks
        return None
    return v.real if v.imag == 0 and math.isfinite(v.real) else None


def symbolic_equal(pred: str, ref: str) -> bool:
    """Qwen2.5-Math's ``symbolic_equal``: same printed form or ``==``; ``equals`` or ``simplify(a - b) == 0``;
    equations equal up to sign; numerically equal (relative 1e-4); matrices equal to 3 decimals.

    Two real constants are decided by the numeric check at once: Qwen's chain reaches the same verdict (its
    symbolic checks cannot prove different numbers equal), but ``equals`` spends up to 0.1 s on each wrong one.
    """
    a, b = _parse(pred), _parse(ref)
    try:
        if str(a) == str(b) or a == b:
            return True
    except Exception:  # printing a huge integer raises ValueError; go on to the other checks
        pass
    va, vb = _real_constant(a), _real_constant(b)
    if va is not None and vb is not None:
        return numeric_equal(va, vb)
    checks = (
        lambda: a.equals(b) or sympy.simplify(a - b) == 0,
        lambda: abs(a.lhs - a.rhs).equals(abs(b.lhs - b.rhs)),
        lambda: numeric_equal(float(sympy.N(a)), float(sympy.N(b))),
        lambda: a.shape == b.shape and a.applyfunc(lambda x: round(x, 3)).equals(b.applyfunc(lambda x: round(x, 3))),
    )
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # as upstream: a check that does not apply (or SymPy cannot decide) is skipped
            pass
    return False


def quick_equal(pred: str | None, ref: str, include_percentage: bool = True) -> bool | None:
    """The verdict :func:`math_equal` reaches from strings and plain numbers alone, or None when it needs more.

    Cheap and bounded (no SymPy), so a training reward can decide most answers in-process.
    """
    if pred is None:
        return False
    pred, ref = str(pred).strip(), str(ref).strip()
    if pred.lower() == ref.lower():
        return True
    if not pred:
        return False
    return _numbers_equal(pred, ref, include_percentage)


def math_equal(pred: str | None, ref: str, depth: int = 0, include_percentage: bool = True) -> bool:
    """Whether prediction ``pred`` is mathematically equal to the reference answer ``ref``.

    ``include_percentage`` (Qwen's flag, on for benchmarks) also accepts ``ref / 100`` and ``ref * 100``; a
    reward turns it off so that a policy cannot earn credit for an answer off by a factor of 100.
    """
    quick = quick_equal(pred, ref, include_percentage)
    if quick is not None:
        return quick
    pred, ref = str(pred).strip(), str(ref).strip()
    if re.sub(r"[{}()]", "", pred).lower() == re.sub(r"[{}()]", "", ref).lower() and not (
        _is_bracketed(pred) and _is_bracketed(ref)
    ):
        return True
    if depth < 3 and "pmatrix" in pred and "pmatrix" in ref:
        mats = [re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", x) for x in (pred, ref)]
        if mats[0] and mats[1]:
            rows = [[line.split("&") for line in m.group(1).split("\\\\") if line.strip()] for m in mats]
            return [len(r) for r in rows[0]] == [len(r) for r in rows[1]] and all(
                math_equal(x, y, depth + 1, include_percentage)
                for r0, r1 in zip(*rows, strict=True)
                for x, y in zip(r0, r1, strict=True)
            )
    pred_parts, ref_parts = _split_top(pred), _split_top(ref)
    if _is_bracketed(pred) and _is_bracketed(ref):
        if pred[0] != ref[0] or pred[-1] != ref[-1]:
            return False
        pred_parts, ref_parts = _split_top(pred[1:-1]), _split_top(ref[1:-1])
        if len(pred_parts) > 1 or len(ref_parts) > 1:
            return (
                len(pred_parts) == len(ref_parts)
                and depth < 3
                and all(
                    math_equal(x, y, depth + 1, include_percentage) for x, y in zip(pred_parts, ref_parts, strict=True)
                )
            )
    elif len(pred_parts) > 1 or len(ref_parts) > 1:
        return (
            len(pred_parts) == len(ref_parts)
            and depth < 3
            and all(math_equal(x, y, depth + 1, include_percentage) for x, y in zip(pred_parts, ref_parts, strict=True))
        )
    if pred.count("=") == 1 and ref.count("=") == 1:
        pl, pr = pred.split("=")
        rl, rr = ref.split("=")
        a, b = f"{pl}-({pr})", f"{rl}-({rr})"
        return symbolic_equal(a, b) or symbolic_equal(f"-({a})", b)
    if pred.count("=") == 1 and "=" not in ref and len(pred.split("=")[0].strip()) <= 2:
        return math_equal(pred.split("=")[1], ref, depth + 1, include_percentage)
    if ref.count("=") == 1 and "=" not in pred and len(ref.split("=")[0].strip()) <= 2:
        return math_equal(pred, ref.split("=")[1], depth + 1, include_percentage)
    return symbolic_equal(pred, ref)


def grade_math_answer(response: str, gold: str, integer: bool = False) -> tuple[bool, str | None]:
    """Extract (last box, else 'the answer is', else last number) and compare; returns (correct, extracted).

    ``integer`` (AIME): the answer must be a whole number equal to the gold, with no numeric tolerance.
    """
    extracted = final_answer(response)
    if extracted is None:
        visible = strip_think(response)
        m = re.search(r"(?:final answer|he answer) is[:\s]*([^\n]+)", visible)
        if m:
            extracted = m.group(1).strip().rstrip(".").strip("$ ")
        else:
            nums = re.findall(r"-?\d*\.?\d+", visible.replace(",", ""))
            extracted = nums[-1] if nums else None
    if extracted is None:
        return False, None
    pred = strip_string(extracted)
    if integer:
        value = _parse_number(pred)
        return value is not None and value == int(gold), extracted
    return math_equal(pred, strip_string(gold)), extracted
