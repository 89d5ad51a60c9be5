"""`import r1v` keeps scikit-learn out of transformers' imports (r1v/core/lean.py), and R1V_KEEP_SKLEARN=1 leaves
transformers as it is."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import sys, r1v, transformers.generation.candidate_generator as c; "
         "print('sklearn' in sys.modules, c.is_sklearn_available())")


def _run(**env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_transformers_imported_after_r1v_does_not_import_sklearn():
    assert _run(R1V_KEEP_SKLEARN="0") == "False False"
    assert _run(R1V_KEEP_SKLEARN="1") == "True True"
