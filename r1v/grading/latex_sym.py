"""LaTeX answers to SymPy through ``latex2sympy2``, the parser the official scorers call.

MATH-Vision's ``evaluation/utils.py`` and Qwen2.5-Math's ``evaluation/grader.py`` both convert answers with
``latex2sympy2.latex2sympy`` (Qwen vendors the same 1.9 code, regenerated for antlr 4.11; the PyPI wheel pins
antlr runtime 4.7.2).  Using the library itself, rather than a look-alike, keeps its leniency where the
official scorer relies on it: it reads the longest valid prefix, so MATH-V's
``\\frac{7}{32}}.theansweris:\\frac{7}{32`` is 7/32 for us as for them.  The MATH/AIME grader and the
rewards ask for a ``strict`` parse of the whole string instead (Qwen's grader gets that strictness from the
two parsers it tries first, below).

``math-verify`` is not used: its ``latex2sympy2_extended`` needs antlr runtime >= 4.9.3, which cannot be
installed next to the 4.7.2 that ``latex2sympy2`` pins.  SymPy's own ``parse_latex`` (tried first by Qwen's
grader) needs antlr 4.11 for the same reason and is skipped; ``parse_expr`` (tried second) executes Python on
model output and is skipped too.

Parsing and evaluation can take unbounded time on hostile input (``9^{9^{9^9}}``): callers run them under
the per-item time bound of :mod:`r1v.grading.pool`.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

import latex2sympy2
from antlr4 import CommonTokenStream, InputStream, Token

# Module-level state the library keeps between calls: ``:=`` assignments and matrix symbols in ``variances`` and
# ``var``; a differential such as ``dx`` (or the ``do`` of a lower-cased "dog") even rebinds ``var`` to a Symbol,
# after which every letter fails to parse until the process ends.  A fresh state per call makes a verdict
# independent of which items the same worker graded before.
_GLOBAL_STATE = ("variances", "var")


class LatexError(ValueError):
    """The library could not parse an answer string (its own errors are bare ``Exception``)."""


@lru_cache(maxsize=8192)
def latex2sympy(latex: str, strict: bool = False) -> Any:
    """``latex2sympy2.latex2sympy(latex)`` from a clean parser state; any failure raises :class:`LatexError`.

    The result is what the library returns: a SymPy expression, a relation, or a list for ``a, b`` (do not
    mutate it: results are cached, since the pure-Python ANTLR parser takes milliseconds and gold answers
    repeat across samples).  ``strict`` also fails when the grammar stops before the end of the input, where
    the library silently returns the prefix (``52_8+x-x+2`` is 52): see :func:`parses_completely`.
    """
    if strict and not parses_completely(latex):
        raise LatexError(f"trailing text the grammar does not read in {latex[:40]!r}")
    for name in _GLOBAL_STATE:
        setattr(latex2sympy2, name, {})
    try:
        return latex2sympy2.latex2sympy(latex)
    except RecursionError as exc:
        raise LatexError(f"nesting too deep in {latex[:40]!r}") from exc
    except Exception as exc:  # the library raises bare Exception (syntax) and many SymPy types
        raise LatexError(str(exc).split("\n", 1)[0] or type(exc).__name__) from exc


def _library_preprocess(latex: str) -> str:
    """The string rewrites ``latex2sympy2.latex2sympy`` 1.9.1 applies before lexing (copied: it has no hook)."""
    s = latex.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    s = s.replace(r"\mathrm{T}", "T", -1)
    s = s.replace(r"\mathrm{d}", "d", -1).replace(r"{\rm d}", "d", -1)
    s = s.replace(r"\left[\begin{matrix}", r"\begin{bmatrix}", -1)
    s = s.replace(r"\end{matrix}\right]", r"\end{bmatrix}", -1)
    s = re.sub(r"\(([a-zA-Z0-9+\-*/\\ ]+?)\)_{([a-zA-Z0-9+\-*/\\ ]+?)}", r"\\frac{(\1)!}{((\1)-(\2))!}", s)
    s = s.replace(r"\displaystyle", " ", -1)
    s = s.replace(r"\quad", " ", -1).replace(r"\qquad", " ", -1).replace(r"~", " ", -1).replace(r"\,", " ", -1)
    return s.replace(r"$", " ", -1)


def parses_completely(latex: str) -> bool:
    """Whether the library's grammar reads all of ``latex``.

    Its top rule has no end-of-input anchor, so parsing stops quietly at the first token that cannot continue
    the expression and the rest is dropped.  MATH-V's scorer depends on that (its greedy box extraction leaves
    text after the answer); a reward or a MATH grader should not credit ``42)(43`` as 42.
    """
    text = _library_preprocess(latex)
    listener = latex2sympy2.MathErrorListener(text)
    lexer = latex2sympy2.PSLexer(InputStream(text))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser = latex2sympy2.PSParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    try:
        parser.math()
    except Exception:  # a syntax error: the listener raises bare Exception; deep nesting raises RecursionError
        return False
    return parser.getCurrentToken().type == Token.EOF


# What ``eval`` sees in MATH-V's ``utils.py``: ``from math import *`` at module level (so ``pi``, ``tau``,
# ``log(100, 10)``, ``sqrt`` work while SymPy's ``E``, ``I``, ``oo`` and bare symbols are NameErrors).
_MATH_NAMESPACE: dict[str, Any] = {k: getattr(math, k) for k in dir(math) if not k.startswith("_")}
_SAFE_BUILTINS = {"abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float}
# SymPy's printer emits names, numbers, arithmetic, comparison and logic operators, brackets and commas
# (``1 < 2`` evaluates to True, which upstream rounds to 1).  Anything else (attribute access, dunders, strings)
# cannot come from an answer's expression, and refusing it keeps ``eval`` from running code.
_PRINTED = re.compile(r"[\w\s+\-*/().,\[\]<>=~&|]*")
_ATTRIBUTE = re.compile(r"__|\.\s*[A-Za-z_]")


def eval_printed(expr: Any) -> Any:
    """``eval(str(expr))`` as MATH-V's scorer does it, in its ``math`` namespace; raises on anything unsafe."""
    text = str(expr)
    if not _PRINTED.fullmatch(text) or _ATTRIBUTE.search(text):
        raise LatexError(f"refusing to evaluate {text[:40]!r}")
    return eval(text, {"__builtins__": _SAFE_BUILTINS, **_MATH_NAMESPACE})  # noqa: S307 - checked above
