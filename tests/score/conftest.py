"""Fixtures of the scoring tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from score_corpora import write


@pytest.fixture
def corpus_factory(tmp_path: Path):
    n = [0]

    def make(rows: list[dict[str, Any]], extra=None, files: int = 1) -> str:
        n[0] += 1
        return str(write(tmp_path / f"corpus{n[0]}", rows, extra, files))

    return make
