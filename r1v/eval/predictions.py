"""Reading predictions: r1v's own JSONL and the benchmarks' published output formats.

Formats, told apart by shape (see :func:`read_predictions`):

- r1v JSONL: one object per line with ``id``, ``response`` and optional ``sample`` (int, default 0); any other
  fields (``answer`` for ``--benchmark math``, ``options`` for MMMU) ride along in ``extra``.  MATH-Vision's
  published ``outputs/*.jsonl`` has the same shape.
- MathVista ``output_*.json``: ``{pid: {..., "response", "extraction"}}``; the stored ``extraction``
  is graded.
- MMMU ``total_val_output.json``: ``{id: parsed_prediction}``.
- MMMU ``example_outputs/MODEL/`` folders (or one ``SUBJECT/output.json``): lists of records with ``id``,
  ``response``, ``all_choices``, ``index2ans``, read in the official subject order (the random fallback
  stream depends on it).

Problems are collected, not raised one at a time, and name the file and line: a user fixes a file
in one go.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v.eval.mmmu import DOMAINS

MMMU_SUBJECT_ORDER = [
    "Accounting",
    "Agriculture",
    "Architecture_and_Engineering",
    "Art",
    "Art_Theory",
    "Basic_Medical_Science",
    "Biology",
    "Chemistry",
    "Clinical_Medicine",
    "Computer_Science",
    "Design",
    "Diagnostics_and_Laboratory_Medicine",
    "Economics",
    "Electronics",
    "Energy_and_Power",
    "Finance",
    "Geography",
    "History",
    "Literature",
    "Manage",
    "Marketing",
    "Materials",
    "Math",
    "Mechanical_Engineering",
    "Music",
    "Pharmacy",
    "Physics",
    "Psychology",
    "Public_Health",
    "Sociology",
]
assert sorted(MMMU_SUBJECT_ORDER) == sorted(s for subs in DOMAINS.values() for s in subs)


@dataclass(frozen=True)
class Prediction:
    """One model response to grade; ``where`` is ``file:line`` (or ``file:key``) for error messages."""

    id: str
    response: str
    sample: int = 0
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class PredictionsError(ValueError):
    """A predictions file is malformed; ``problems`` lists every ``file:line: problem`` found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__("malformed predictions:\n  " + "\n  ".join(shown))


def _record(obj: Any, where: str, problems: list[str], response_key: str = "response") -> Prediction | None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
        return None
    missing = [k for k in ("id", response_key) if k not in obj]
    if missing:
        problems.append(f"{where}: missing field {', '.join(repr(m) for m in missing)}")
        return None
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        problems.append(f"{where}: field 'id' must be a string or integer, got {type(obj['id']).__name__}")
        return None
    if not isinstance(obj[response_key], str):
        problems.append(
            f"{where}: field {response_key!r} must be a string, got {type(obj[response_key]).__name__}"
        )
        return None
    sample = obj.get("sample", 0)
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
        problems.append(f"{where}: field 'sample' must be a non-negative integer, got {sample!r}")
        return None
    extra = {k: v for k, v in obj.items() if k not in ("id", response_key, "sample")}
    return Prediction(id=str(obj["id"]), response=obj[response_key], sample=sample, where=where, extra=extra)


def _read_jsonl(path: Path, problems: list[str]) -> list[Prediction]:
    preds = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if (p := _record(obj, where, problems)) is not None:
                preds.append(p)
    return preds


def _read_mmmu_dir(path: Path, problems: list[str]) -> list[Prediction]:
    folders = {p.parent.name: p for p in path.glob("*/output.json")}
    order = [s for s in MMMU_SUBJECT_ORDER if s in folders] + sorted(set(folders) - set(MMMU_SUBJECT_ORDER))
    if not order:
        problems.append(f"{path}: no SUBJECT/output.json files in this folder")
    preds = []
    for subject in order:
        preds.extend(_read_json(folders[subject], problems))
    return preds


def _read_json(path: Path, problems: list[str]) -> list[Prediction]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problems.append(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})")
        return []
    preds = []
    if isinstance(data, list):
        for i, obj in enumerate(data):
            if (p := _record(obj, f"{path}:[{i}]", problems)) is not None:
                preds.append(p)
    elif isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}:{key}"
            if isinstance(value, str):
                preds.append(Prediction(id=key, response=value, where=where, extra={"parsed": True}))
            elif isinstance(value, dict) and ("extraction" in value or "response" in value):
                extra = {k: v for k, v in value.items() if k != "response"}
                response = value.get("response") or ""
                if not isinstance(response, str):
                    problems.append(f"{where}: field 'response' must be a string")
                    continue
                preds.append(
                    Prediction(id=str(value.get("pid", key)), response=response, where=where, extra=extra)
                )
            else:
                problems.append(
                    f"{where}: expected a parsed answer string or an object with 'extraction'/'response'"
                )
    else:
        problems.append(f"{path}: expected a JSON object or list at top level")
    return preds


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read any supported predictions format; raise :class:`PredictionsError` listing every problem."""
    path = Path(path)
    problems: list[str] = []
    if not path.exists():
        raise PredictionsError([f"{path}: no such file or folder"])
    if path.is_dir():
        preds = _read_mmmu_dir(path, problems)
    elif path.suffix == ".json":
        preds = _read_json(path, problems)
    else:
        preds = _read_jsonl(path, problems)
    seen: dict[tuple[str, int], str] = {}
    for p in preds:
        key = (p.id, p.sample)
        if key in seen:
            problems.append(
                f"{p.where}: duplicate prediction for id {p.id!r} sample {p.sample} (first at {seen[key]})"
            )
        seen.setdefault(key, p.where)
    if problems:
        raise PredictionsError(problems)
    if not preds:
        raise PredictionsError([f"{path}: no predictions found"])
    return preds
