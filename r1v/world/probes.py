"""Transfer probes of the miniature world, with no training: what a VLM reads off an image, and how well it
reasons on what it read. They read eval predictions (`predictions.jsonl` of `eval` stages), so every VLM is
probed by the same generation code as the results table.

- **Read rate**: asked `Transcribe the grid.` about a test image (`perception_rows`), the share of the four cells
  whose digit the VLM writes correctly (`read_rate`). A cell is read when its letter's first mention has the
  right digit (`A7`, as the cell tokens are written, or `A = 7`, as a reasoning chain writes it); a cell not
  written is not read. `boxed_cells` reads the answer box alone. Shown another item's image (shuffled) or a
  blank one, a VLM that reads its image drops to about what guessing gives (0.1 per cell for random digits):
  the control that the rate measures the image, not the format.
- **Reads in the chain**: a reasoning VLM's chain starts with the reads of the letters the item uses
  (`A = 3, C = 5.`); `chain_reads` takes them from the task's own predictions.
- **Reasoning given perception**: task accuracy on the items whose used cells were all read correctly, by the
  probe or by the chain (`given_perception`), against the items where a read was wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from r1v.world.domain import LETTERS, labelled_digits

PROBE_QUESTION = "Transcribe the grid."
_CELL = re.compile(r"([ABCD])(?: ?= ?)?(\d)")


def perception_rows(test_rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The test rows asked `PROBE_QUESTION` about their own image; the answer is the grid transcribed (`A7B7C6D3`).
    Ids, images and `meta` (digits, used letters) are kept, so a probe joins its task item by id."""
    out = []
    for r in test_rows:
        meta = json.loads(r["meta"]) if isinstance(r.get("meta"), str) else dict(r.get("meta") or {})
        digits = tuple(int(c) for c in meta["digits"])
        out.append({**r, "messages": [{"role": "user", "content": f"<image>\n{PROBE_QUESTION}"}],
                    "answer": labelled_digits(digits), "source": "world/probe",
                    "meta": json.dumps({**meta, "probe": "transcribe"})})
    return out


def read_cells(text: str) -> dict[str, int]:
    """The digit written for each letter in `text`, at its first mention (`A7` or `A = 7`); letters never
    followed by a digit are absent. A reasoning VLM asked to transcribe writes its reads in the chain first
    (`A = 0, B = 6, ...`) and boxes a copy, which it may copy wrong; the first mention is what it read."""
    out: dict[str, int] = {}
    for letter, digit in _CELL.findall(text):
        out.setdefault(letter, int(digit))
    return out


def boxed_cells(text: str) -> dict[str, int]:
    """The cells of the last answer box only (`\\boxed{A7B7C6D3}`): the transcription as the answer gives it."""
    box = text.rfind("\\boxed{")
    return read_cells(text[box:].split("}", 1)[0]) if box >= 0 else {}


def chain_reads(response: str) -> dict[str, int]:
    """The reads of a reasoning chain: its first segment, up to the first period (`A = 3, C = 5.`)."""
    first = response.split(".", 1)[0]
    return {letter: int(d) for letter, d in _CELL.findall(first)}


def _greedy(preds: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The primary generation of each item by id: greedy where there is one, else the first sample."""
    out: dict[str, dict[str, Any]] = {}
    for p in preds:
        if p.get("greedy") or (p.get("sample") == 0 and p["id"] not in out):
            out[p["id"]] = p
    return out


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n if n else 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n) if n else 0.0


def read_rate(preds: Iterable[dict[str, Any]], digits: dict[str, tuple[int, ...]],
              letters: dict[str, list[str]] | None = None, reader=read_cells) -> dict[str, Any]:
    """Per-cell read rate of the primary generations in `preds` against each item's true `digits` (by id):
    over all four cells, or over `letters[id]` (the cells the item uses) when given. The standard error is over
    items (the cells of one image are not independent). `exact`: the share of items with every cell read."""
    per_item, exact = [], []
    by_letter: dict[str, list[int]] = {k: [] for k in LETTERS}
    for i, p in _greedy(preds).items():
        got = reader(p["response"])
        cells = letters[i] if letters is not None else list(LETTERS)
        hits = [int(got.get(k) == digits[i][LETTERS.index(k)]) for k in cells]
        for k, h in zip(cells, hits, strict=True):
            by_letter[k].append(h)
        per_item.append(sum(hits) / len(hits))
        exact.append(float(all(hits)))
    rate, se = _mean_se(per_item)
    return {"items": len(per_item), "rate": rate, "stderr": se, "exact": _mean_se(exact)[0],
            "by_letter": {k: sum(v) / len(v) for k, v in by_letter.items() if v}}


def perceived(preds: Iterable[dict[str, Any]], digits: dict[str, tuple[int, ...]],
              letters: dict[str, list[str]], reader=read_cells) -> dict[str, bool]:
    """By id: whether every cell the item uses was read correctly in its primary generation."""
    return {i: all(reader(p["response"]).get(k) == digits[i][LETTERS.index(k)] for k in letters[i])
            for i, p in _greedy(preds).items()}


def given_perception(task_preds: Iterable[dict[str, Any]], seen: dict[str, bool]) -> dict[str, Any]:
    """Task accuracy (primary generations) on the items read correctly (`seen[id]` true) and on the rest."""
    out: dict[str, Any] = {}
    task = _greedy(task_preds)
    for key, want in (("read", True), ("missed", False)):
        xs = [float(p["correct"]) for i, p in task.items() if seen.get(i) is want]
        acc, se = _mean_se(xs)
        out[key] = {"n": len(xs), "accuracy": acc, "stderr": se}
    return out


def accuracy(preds: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Task accuracy of the primary generations, with its standard error."""
    xs = [float(p["correct"]) for p in _greedy(preds).values()]
    acc, se = _mean_se(xs)
    return {"n": len(xs), "accuracy": acc, "stderr": se}
