"""Benchmark evaluation: loaders, answer extraction, official-rule graders, pass@1.

Public API (imported lazily so that ``import r1v.eval`` stays cheap; SymPy loads only when grading):

- :class:`~r1v.eval.items.BenchItem`, :func:`~r1v.eval.loaders.load_benchmark`,
  :data:`~r1v.eval.loaders.LOADERS`
- :data:`~r1v.eval.graders.GRADERS`, :func:`~r1v.eval.graders.get_grader`
- :func:`~r1v.eval.grading.grade_predictions` -> :class:`~r1v.eval.grading.GradeReport`
- :func:`~r1v.eval.predictions.read_predictions`, :class:`~r1v.eval.predictions.PredictionsError`
- :func:`~r1v.eval.passk.pass_at_1`, :func:`~r1v.grading.extract.final_answer`
- ``r1v eval grade``: :mod:`r1v.cli.grade`
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchItem": "r1v.eval.items",
    "default_data_root": "r1v.eval.items",
    "load_benchmark": "r1v.eval.loaders",
    "LOADERS": "r1v.eval.loaders",
    "GRADERS": "r1v.eval.graders",
    "get_grader": "r1v.eval.graders",
    "grade_predictions": "r1v.eval.grading",
    "GradeReport": "r1v.eval.grading",
    "Verdict": "r1v.eval.grading",
    "Prediction": "r1v.eval.predictions",
    "read_predictions": "r1v.eval.predictions",
    "PredictionsError": "r1v.eval.predictions",
    "pass_at_1": "r1v.eval.passk",
    "final_answer": "r1v.grading.extract",
    "strip_think": "r1v.grading.extract",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'r1v.eval' has no attribute {name!r}")
