"""r1v: the Skywork-R1V recipe (projector transfer, iterative SFT, GRPO, AL-CoTD) as a resumable Ray pipeline."""

from r1v.core.lean import install as _lean_imports

_lean_imports()

__version__ = "0.1.0"
