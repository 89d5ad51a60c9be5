"""`import r1v` keeps scikit-learn and SciPy out of transformers' imports and MLflow out of DeepSpeed's
(r1v/core/lean.py); R1V_KEEP_IMPORTS=1 leaves both libraries as they are."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import sys, r1v, transformers.generation.candidate_generator as c, transformers.loss.loss_utils; "
         "from r1v.train.engine import prepare_deepspeed; prepare_deepspeed(); "
         "print('sklearn' in sys.modules, c.is_sklearn_available(), 'scipy' in sys.modules, 'mlflow' in sys.modules); "
         "import mlflow; print(mlflow.__name__)")


def _run(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_optional_imports_are_hidden_and_import_later_as_usual():
    # hidden while transformers and DeepSpeed load; MLflow (which the process may log to) still imports after
    assert _run(R1V_KEEP_IMPORTS="0") == ["False", "False", "False", "False", "mlflow"]
    assert _run(R1V_KEEP_IMPORTS="1") == ["True", "True", "True", "True", "mlflow"]


def test_without_hides_only_what_was_not_imported():
    from r1v.core.lean import without

    with without("json", "r1v_no_such_module_yet"):
        import json  # already imported: left alone

        try:
            import r1v_no_such_module_yet  # noqa: F401
        except ImportError as e:
            assert "halted" in str(e)
        else:
            raise AssertionError("not hidden")
    assert "r1v_no_such_module_yet" not in sys.modules and json.dumps(1) == "1"
