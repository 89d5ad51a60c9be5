"""Guards for moving code: the shipped workflows' per-stage fingerprints and `r1v plan`'s text stay as recorded.

A stage's fingerprint decides whether `r1v resume` skips it: if it changed, every existing run directory would
re-run the stage. The recorded values were computed from the shipped workflows; a change here must be deliberate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1v.workflow.fingerprint import SCHEME
from r1v.workflow.runner import Runner
from r1v.workflow.schema import load_workflow

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
WORKFLOWS = ["tiny.yaml", "r1v-38b.yaml"]


def fingerprints(name: str, tmp_path: Path, scheme: int = SCHEME) -> dict[str, str]:
    wf = load_workflow(ROOT / "workflows" / name)
    return Runner(wf, tmp_path / "run").fingerprints(scheme)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_fingerprints_are_the_recorded_ones(name, tmp_path):
    want = json.loads((GOLDEN / "fingerprints.json").read_text())[name]
    assert fingerprints(name, tmp_path) == want


@pytest.mark.parametrize("name", WORKFLOWS)
def test_runs_made_under_the_first_scheme_keep_their_fingerprints(name, tmp_path):
    """Runs written before scheme 2 are judged by scheme 1: its values for the shipped workflows are those that
    the code of that time recorded, so such a run's finished stages stay done."""
    want = json.loads((GOLDEN / "fingerprints-scheme1.json").read_text())[name]
    assert fingerprints(name, tmp_path, 1) == want


def test_plan_text_is_the_recorded_one():
    cmd = [sys.executable, "-m", "r1v.cli", "plan", "workflows/r1v-38b.yaml", "--gpus", "64", "--gpu-memory", "80GB"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out == (GOLDEN / "plan-r1v-38b-64x80GB.txt").read_text()


if __name__ == "__main__":  # python tests/test_golden.py: record today's values (a deliberate change)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        fps = {n: fingerprints(n, Path(d)) for n in WORKFLOWS}
    (GOLDEN / "fingerprints.json").write_text(json.dumps(fps, indent=1, sort_keys=True) + "\n")
