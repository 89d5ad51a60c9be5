"""A pytest plugin: the machine's busy CPU seconds and the wall seconds of each test (setup, call and teardown),
written as JSON after every test. Meaningful with `-n 0` (one test at a time) on an otherwise quiet machine: it
counts every process's CPU (Ray actors, servers, the shared clusters' idle cost), not only the test's.

    PYTHONPATH=bench python -m pytest -q -n 0 -p pytest_cpu_per_test TESTS...   # R1V_CPU_PER_TEST=out.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cpu_by_process import TICK, busy_ticks  # bench/, on PYTHONPATH

_seen: dict[str, tuple[float, float]] = {}


def _busy() -> float:
    return busy_ticks()[0] / TICK


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _busy(), time.monotonic()
    yield
    _seen[item.nodeid] = (round(_busy() - cpu, 1), round(time.monotonic() - wall, 1))
    out = Path(os.environ.get("R1V_CPU_PER_TEST", "cpu_per_test.json"))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(_seen, indent=1))
    os.replace(tmp, out)


def pytest_terminal_summary(terminalreporter):
    rows = sorted(_seen.items(), key=lambda kv: -kv[1][0])
    terminalreporter.write_line(f"busy CPU-s / wall s by test ({sum(v[0] for _, v in rows):.0f} CPU-s in all):")
    for nodeid, (cpu, wall) in rows[:40]:
        terminalreporter.write_line(f"{cpu:8.1f} {wall:8.1f}  {nodeid}")
