"""Shared fixtures: the benchmark data root (read in place, never copied) and a CLI runner."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from r1v.cli.grade import add_grade_parser, grade_main
from r1v.eval.items import default_data_root


@pytest.fixture(scope="session")
def bench_root() -> Path:
    root = default_data_root()
    if not (root / "README.md").exists():
        pytest.skip(f"benchmark data not found at {root}")
    return root


def _run_grade(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="r1v eval")
    add_grade_parser(parser.add_subparsers(dest="cmd", required=True))
    return grade_main(parser.parse_args(["grade", *argv]))


@pytest.fixture
def run_grade():
    """Parse argv with the real sub-parser (as ``r1v eval grade`` would) and run :func:`grade_main`."""
    return _run_grade
