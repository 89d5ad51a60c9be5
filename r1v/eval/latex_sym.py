"""A small LaTeX-to-SymPy converter for answer strings.

The official MATH/AIME and MATH-Vision scorers lean on ``latex2sympy2`` (an ANTLR grammar pinned to an old
runtime).  Final answers are short expressions, so a dependency-free converter covering fractions, roots,
powers, the usual functions and constants, and implicit multiplication is enough and keeps the project
installable.  The output of :func:`latex_to_python` uses a fixed vocabulary and is checked before SymPy's
``parse_expr`` (which evaluates Python) ever sees it, so model output cannot run code.
"""

from __future__ import annotations

import re
from functools import lru_cache

import sympy
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

FUNCTIONS = {
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "log",
    "ln",
    "exp",
    "sqrt",
    "root",
    "binomial",
    "Abs",
    "factorial",
}
_CONSTANTS = {"pi", "oo"}
_COMMAND_MAP = {
    "cdot": "*",
    "times": "*",
    "ast": "*",
    "div": "/",
    "pi": " pi ",
    "infty": " oo ",
    "infinity": " oo ",
    "ln": " log ",
    "log": " log ",
    "exp": " exp ",
    "lfloor": "",
    "rfloor": "",
    "lceil": "",
    "rceil": "",
}
for _f in ("sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh"):
    _COMMAND_MAP[_f] = f" {_f} "
_DROP = re.compile(r"\\(left|right|displaystyle|!|,|;|:|quad|qquad|big|Big|bigg|Bigg)(?![a-zA-Z])|\\ |\$")
_WRAPPERS = ("text", "mathrm", "textbf", "mathbf", "mbox", "operatorname", "boldsymbol", "mathit")
_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)
_SAFE = re.compile(r"^[A-Za-z0-9\s+\-*/().,]*$")


class LatexError(ValueError):
    """Raised when an answer string is outside the LaTeX subset this converter understands."""


def _group(s: str, i: int) -> tuple[str, int]:
    """Read one argument at ``s[i]``: a brace group, a ``\\command``, or a single character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise LatexError("missing argument")
    if s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : j], j + 1
        raise LatexError("unbalanced braces")
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def _convert(s: str, depth: int = 0) -> str:
    """Rewrite LaTeX into Python syntax, recursing into arguments (depth-bounded: pathological input)."""
    if depth > 50:
        raise LatexError("nesting too deep")
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not m:
                raise LatexError(f"bad command at {s[i : i + 5]!r}")
            name = m.group(1)
            i += m.end()
            if name in ("frac", "dfrac", "tfrac", "cfrac", "binom", "dbinom", "tbinom"):
                a, i = _group(s, i)
                b, i = _group(s, i)
                a, b = _convert(a, depth + 1), _convert(b, depth + 1)
                out.append(f"(({a})/({b}))" if "frac" in name else f" binomial({a},{b}) ")
            elif name == "sqrt":
                idx = None
                while i < len(s) and s[i] == " ":
                    i += 1
                if i < len(s) and s[i] == "[":
                    close = s.find("]", i)
                    if close < 0:
                        raise LatexError("unclosed root index")
                    idx, i = _convert(s[i + 1 : close], depth + 1), close + 1
                a, i = _group(s, i)
                a = _convert(a, depth + 1)
                out.append(f" sqrt({a}) " if idx is None else f" root({a},{idx}) ")
            elif name in _WRAPPERS:
                a, i = _group(s, i)
                out.append(_convert(a, depth + 1))
            elif name in _COMMAND_MAP:
                out.append(_COMMAND_MAP[name])
            else:
                raise LatexError(f"unsupported command \\{name}")
        elif ch in "^":
            a, i = _group(s, i + 1)
            out.append(f"**({_convert(a, depth + 1)})")
        elif ch == "{":
            a, i = _group(s, i)
            out.append(f"({_convert(a, depth + 1)})")
        elif ch == "[":
            out.append("(")
            i += 1
        elif ch == "]":
            out.append(")")
            i += 1
        elif ch == "!":
            out.append(" factorial_ ")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _split_identifiers(expr: str) -> str:
    """Keep known names; split other letter runs into single-letter symbols (``xy`` means ``x*y``)."""

    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        if word in FUNCTIONS or word in _CONSTANTS or word == "factorial_":
            return word
        return "*".join(word)

    return re.sub(r"[A-Za-z_]+", repl, expr)


def latex_to_python(latex: str) -> str:
    """Translate an answer string to a restricted Python expression; raise :class:`LatexError` otherwise."""
    s = latex.strip()
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").replace("%", "")
    s = _DROP.sub(" ", s)
    s = s.replace("\\{", "(").replace("\\}", ")")
    expr = _convert(s)
    expr = re.sub(
        r"(\))\s*factorial_|(\w+)\s*factorial_", lambda m: f" factorial({m.group(1) or m.group(2)})", expr
    )
    if "factorial_" in expr:
        raise LatexError("dangling factorial")
    expr = _split_identifiers(expr)
    expr = re.sub(r"(\d)\.(?!\d)", r"\1", expr)
    expr = re.sub(r"(?<![\d.])0+(?=\d)", "", expr)
    if not _SAFE.match(expr) or re.search(r"\.(?!\d)", expr) or "**(" * 20 in expr:
        raise LatexError(f"unsafe or unsupported expression {expr!r}")
    if not expr.strip():
        raise LatexError("empty expression")
    return expr


_LOCALS: dict[str, object] = {
    name: getattr(sympy, name) for name in ("sqrt", "root", "binomial", "Abs", "exp")
}
_LOCALS.update(
    {
        "sin": sympy.sin,
        "cos": sympy.cos,
        "tan": sympy.tan,
        "cot": sympy.cot,
        "sec": sympy.sec,
        "csc": sympy.csc,
        "arcsin": sympy.asin,
        "arccos": sympy.acos,
        "arctan": sympy.atan,
        "sinh": sympy.sinh,
        "cosh": sympy.cosh,
        "tanh": sympy.tanh,
        "log": sympy.log,
        "ln": sympy.log,
        "factorial": sympy.factorial,
        "pi": sympy.pi,
        "oo": sympy.oo,
        "i": sympy.I,
    }
)
for _c in "abcdefghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
    _LOCALS[_c] = sympy.Symbol(_c)


@lru_cache(maxsize=4096)
def parse_latex_expr(latex: str) -> sympy.Expr:
    """Parse an answer string to a SymPy expression (``i`` is the imaginary unit, other letters symbols)."""
    expr = latex_to_python(latex)
    try:
        return parse_expr(expr, local_dict=dict(_LOCALS), transformations=_TRANSFORMS, evaluate=True)
    except Exception as exc:  # parse_expr raises many types (SyntaxError, TypeError, TokenError...)
        raise LatexError(f"cannot parse {expr!r}: {exc}") from exc
