"""A pytest plugin: when each test ran, on which xdist worker - to see where a parallel suite leaves a core idle
(a worker that ends early while another runs a long test). Appends one JSON line per test (worker, test, start and
end in seconds since the epoch) to $R1V_TIMELINE (default timeline.jsonl); run as a script it prints each worker's busy
span and its last tests.

    PYTHONPATH=bench python -m pytest -q -p pytest_timeline ...
    python bench/pytest_timeline.py timeline.jsonl
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.time()
    yield
    line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid, "start": start,
            "end": time.time()}
    with Path(os.environ.get("R1V_TIMELINE", "timeline.jsonl")).open("a") as f:  # one short line: O_APPEND
        f.write(json.dumps(line) + "\n")


def summary(path: str, last: int = 6) -> None:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    t0 = min(r["start"] for r in rows)
    end = max(r["end"] for r in rows)
    for w in sorted({r["worker"] for r in rows}):
        mine = sorted((r for r in rows if r["worker"] == w), key=lambda r: r["start"])
        busy = sum(r["end"] - r["start"] for r in mine)
        print(f"{w}: {len(mine)} tests, first start {mine[0]['start'] - t0:.0f} s, last end "
              f"{mine[-1]['end'] - t0:.0f} s (suite's last end {end - t0:.0f} s), in tests {busy:.0f} s")
        for r in mine[-last:]:
            print(f"    {r['start'] - t0:7.0f} {r['end'] - r['start']:6.0f}  {r['test']}")


if __name__ == "__main__":
    summary(sys.argv[1])
