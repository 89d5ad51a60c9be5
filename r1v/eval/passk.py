"""pass@1 over K samples: the mean of per-sample accuracies, with their spread."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def pass_at_1(
    verdicts_by_sample: Mapping[int, Sequence[bool]] | Sequence[Sequence[bool]],
) -> tuple[float, float]:
    """Return ``(mean, std)`` of accuracy across samples (each a sequence of per-item correctness).

    The paper reports pass@1 averaged over several sampled runs; the spread tells whether a difference between
    checkpoints is larger than sampling noise.  ``std`` is the sample standard deviation (ddof=1) across runs,
    0.0 for a single run.  Every run must cover at least one item.
    """
    runs = (
        list(verdicts_by_sample.values())
        if isinstance(verdicts_by_sample, Mapping)
        else list(verdicts_by_sample)
    )
    if not runs:
        raise ValueError("pass_at_1 needs at least one sample")
    accs = []
    for k, run in enumerate(runs):
        if len(run) == 0:
            raise ValueError(f"sample {k} has no verdicts")
        accs.append(sum(bool(v) for v in run) / len(run))
    mean = sum(accs) / len(accs)
    if len(accs) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
