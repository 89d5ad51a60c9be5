"""The common benchmark item type and where benchmark data lives.

Every loader returns :class:`BenchItem` so that the generation runner builds prompts and the graders read gold
answers the same way for every benchmark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_DATA_ROOT = "R1V_BENCHMARKS"


@dataclass
class BenchItem:
    """One benchmark question.

    ``question`` is the bare question text; ``query`` the benchmark's official full prompt where it publishes
    one (MathVista ``query.json``, AIME 2025 ``prompt``).  ``choices`` are option texts in letter order (None
    for free-form).  ``answer`` is the gold answer as the official scorer compares it (a letter for MMMU and
    MATH-Vision multiple choice, the option text for MathVista).  ``images`` holds encoded image bytes in
    order, or None when the benchmark has no images here.  ``category`` maps breakdown keys to values (a list
    where an item has several, like MathVista skills).
    """

    id: str
    question: str
    answer: Any
    choices: list[str] | None = None
    images: list[bytes] | None = None
    query: str | None = None
    category: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def repo_root() -> Path:
    """The checkout holding the ``r1v`` package (``r1v/eval/items.py`` -> two levels up)."""
    return Path(__file__).resolve().parents[2]


def default_data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Benchmark data root: ``explicit``, else ``$R1V_BENCHMARKS``, else ``../shared/data/benchmarks``.

    The data is shared read-only beside the repository rather than copied into it, so the default is resolved
    from the package location, not the working directory.
    """
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        return Path(env)
    return (repo_root().parent / "shared" / "data" / "benchmarks").resolve()
