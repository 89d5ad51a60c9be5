"""An engine host for the engine-failure tests, steered by control files beside the model directory it loads (the
test owns that directory; Ray actors started before the test could not see an environment variable it sets).

- every start appends the actor's pid to `starts`;
- `hang`: generate writes the time to `generate-started` and sleeps (a hung engine);
- `kill-at-seed` (a number): the generate call with that seed, until `killed` exists, writes the actor's pid to
  `pid`, then waits to be killed (the test kills it by that pid and writes `killed`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from r1v.generation.engines import EngineHost
from r1v.generation.warm_pool import EvalEngineHost


class ControlledHost(EngineHost):
    def __init__(self, kind: str, model_dir: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(kind, model_dir, *args, **kwargs)
        self.control = Path(model_dir).parent
        with open(self.control / "starts", "a") as f:
            f.write(f"{os.getpid()}\n")

    def generate(self, requests, sampling, n, seed, version=None):
        if (self.control / "hang").exists():
            (self.control / "generate-started").write_text(str(time.time()))
            time.sleep(3600)
        at = self.control / "kill-at-seed"
        if at.exists() and int(at.read_text()) == seed and not (self.control / "killed").exists():
            (self.control / "pid").write_text(str(os.getpid()))
            time.sleep(300)  # the test kills this process meanwhile
        return super().generate(requests, sampling, n, seed, version)


class ControlledEvalHost(ControlledHost, EvalEngineHost):
    """The same, for the eval pool (which swaps models)."""
