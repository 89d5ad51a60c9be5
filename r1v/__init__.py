"""r1v: the Skywork-R1V recipe (projector transfer, iterative SFT, GRPO, AL-CoTD) as a resumable Ray pipeline."""

__version__ = "0.1.0"
