"""Process start-up without an import r1v never uses.

transformers imports scikit-learn whenever it is installed (`generation/candidate_generator.py`, for assisted
generation's dynamic threshold alone); MLflow requires it, so it is installed. It costs about 0.8 CPU-s per
process on a 2-core machine, and every Ray Train worker, engine actor, data task and stage process of r1v imports
transformers. `install` (run by `import r1v`) makes transformers see scikit-learn as absent; nothing of r1v uses
assisted generation. R1V_KEEP_SKLEARN=1 leaves transformers as it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType

TARGET = "transformers.utils"


def _hide_sklearn(module: ModuleType) -> None:
    module.is_sklearn_available = lambda: False  # type: ignore[attr-defined]


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
            _hide_sklearn(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader
        return spec


def install() -> None:
    if os.environ.get("R1V_KEEP_SKLEARN") == "1":
        return
    if TARGET in sys.modules:  # transformers came first: patch it (too late only for modules already loaded)
        _hide_sklearn(sys.modules[TARGET])
    elif not any(isinstance(f, _AfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLoad())
