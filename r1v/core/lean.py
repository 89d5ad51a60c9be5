"""Process start-up without imports r1v never uses.

Every Ray Train worker, engine actor, data task and stage process of r1v imports transformers, and every trainer
DeepSpeed; both import optional packages whenever they are installed, for features r1v does not use:
- transformers: scikit-learn (`generation/candidate_generator.py`, assisted generation's dynamic threshold; MLflow
  requires it, so it is installed), about 0.8 CPU-s a process on a 2-core machine, and SciPy (the detection
  models' matching losses), about 0.5 CPU-s. `install` (run by `import r1v`) makes transformers see both as
  absent.
- DeepSpeed: MLflow (its autotuner's logging), about 0.9 CPU-s a trainer; `without("mlflow")` around the import
  (`r1v.train.engine.prepare_deepspeed`). A process that logs to MLflow imports it later as usual.
R1V_KEEP_IMPORTS=1 leaves both libraries as they are.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

TARGET = "transformers.utils"


def _keep() -> bool:
    return os.environ.get("R1V_KEEP_IMPORTS") == "1"


def _hide_optional(module: ModuleType) -> None:
    module.is_sklearn_available = lambda: False  # type: ignore[attr-defined]
    module.is_scipy_available = lambda: False  # type: ignore[attr-defined]


class _AfterLoad(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers.utils` is imported, it wraps the real loader so that the module is
    patched as soon as it has run, before any other transformers module reads it."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one module, once; the other finders locate it
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _hide_optional(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader
        return spec


def install() -> None:
    if _keep():
        return
    if TARGET in sys.modules:  # transformers came first: patch it (too late only for modules already loaded)
        _hide_optional(sys.modules[TARGET])
    elif not any(isinstance(f, _AfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLoad())


@contextlib.contextmanager
def without(*names: str) -> Iterator[None]:
    """Imports inside see the top-level packages `names` as not installed, unless already imported; afterwards
    they import as usual."""
    hidden = [] if _keep() else [n for n in names if n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None  # type: ignore[assignment]  # `import n` raises ImportError
    try:
        yield
    finally:
        for n in hidden:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]
