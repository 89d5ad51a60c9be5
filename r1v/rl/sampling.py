"""Which samples a GRPO step trains on: DAPO's dynamic sampling and R1V2's Selective Sample Buffer (SSB).

Both fight the same waste: a group whose G rewards are all equal has zero advantage everywhere, so it adds no
policy gradient (only normaliser mass and compute). Dynamic sampling drops such groups and generates more
prompts until the batch is full of informative ones (bounded by `max_rounds`); the SSB keeps earlier samples with
non-zero advantage and replays them, drawn in proportion to |advantage|, in place of this step's zero-advantage
samples (R1V2, arXiv 2504.16656, "Vanishing Advantages"). No engines or Ray here: generation is a callback.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def informative_groups(rewards: Any, atol: float = 0.0) -> list[bool]:
    """Per group (rows of `rewards` [n_groups, G], a tensor, array or nested list): are its rewards not all equal
    (max - min > atol)? Only those groups get a non-zero GRPO / Dr. GRPO advantage."""
    r = np.asarray(rewards.detach().cpu() if hasattr(rewards, "detach") else rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [n_groups, group_size], got shape {r.shape}")
    return ((r.max(axis=1) - r.min(axis=1)) > atol).tolist() if r.size else [False] * r.shape[0]


@dataclass
class DynamicSample(Generic[T]):
    """What `dynamic_sample` collected. `generated == len(groups) + dropped + surplus` always."""

    groups: list[T] = field(default_factory=list)  # informative groups, in generation order, at most `needed`
    uninformative: list[T] = field(default_factory=list)  # the dropped ones: fillers at loss weight 0, if wanted
    generated: int = 0  # groups generated over all rounds
    dropped: int = 0  # groups with all-equal rewards
    surplus: int = 0  # informative groups beyond `needed`, discarded
    rounds: int = 0
    needed: int = 0

    @property
    def filled(self) -> bool:
        return len(self.groups) >= self.needed


def dynamic_sample(generate: Callable[[int, int], tuple[Sequence[T], Any]], needed: int, max_rounds: int,
                   oversample: float = 1.0, atol: float = 0.0) -> DynamicSample[T]:
    """DAPO's dynamic sampling: call `generate(round, n)` -> (n groups, their rewards [n, G]) for
    ceil((needed - kept) * oversample) groups per round, keep the informative ones, until `needed` are kept or
    `max_rounds` rounds ran (then fewer are returned: `filled` is False; the caller may train on what there is
    or skip the step). `generate` decides which prompts a round uses (seed them by step and round to resume
    exactly); it may return fewer than n groups (say, the data ran out), and a round that returns none ends it.
    """
    if needed < 1 or max_rounds < 1 or oversample < 1:
        raise ValueError(f"need needed >= 1, max_rounds >= 1, oversample >= 1; got {needed}, {max_rounds}, "
                         f"{oversample}")
    out: DynamicSample[T] = DynamicSample(needed=needed)
    while out.rounds < max_rounds and not out.filled:
        n = math.ceil((needed - len(out.groups)) * oversample)
        groups, rewards = generate(out.rounds, n)
        out.rounds += 1
        keep = informative_groups(rewards, atol) if len(groups) else []
        if len(keep) != len(groups):
            raise ValueError(f"generate returned {len(groups)} groups but rewards for {len(keep)}")
        out.generated += len(groups)
        for g, k in zip(groups, keep, strict=True):
            if not k:
                out.dropped += 1
                out.uninformative.append(g)
            elif out.filled:
                out.surplus += 1
            else:
                out.groups.append(g)
        if not groups:
            break
    return out


class SelectiveSampleBuffer(Generic[T]):
    """R1V2's SSB: a bounded FIFO of samples with non-zero advantage, replayed with probability ∝ |advantage|.

    The rule implemented (R1V2 states it loosely): per step and rank, the step's zero-advantage samples (they
    carry no policy gradient) are replaced by `replay_count(...)` samples drawn from the buffer, each trained on
    with its *stored* advantage; the batch keeps its size and gains signal. Adding a step's samples after
    drawing keeps a step from replaying its own samples. A replayed sample is off-policy: the trainer recomputes
    pi_old for it, and its rollout log-probs are stale, so truncated importance weights do not apply to it.
    """

    def __init__(self, capacity: int, seed: int = 0, eps: float = 0.0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.eps = capacity, eps
        self._items: deque[tuple[float, T]] = deque(maxlen=capacity)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, sample: T, advantage: float) -> bool:
        """Store `sample` if |advantage| > eps (the oldest goes when full). Returns whether it was stored."""
        a = float(advantage)
        if not abs(a) > self.eps:  # also refuses NaN
            return False
        self._items.append((a, sample))
        return True

    def extend(self, samples: Sequence[T], advantages: Sequence[float]) -> int:
        """`add` each pair; returns how many were stored."""
        if len(samples) != len(advantages):
            raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
        return sum(self.add(s, a) for s, a in zip(samples, advantages, strict=True))

    def replay_count(self, n_samples: int, n_zero: int, max_fraction: float = 1.0) -> int:
        """How many samples to replay in a batch of `n_samples` of which `n_zero` have zero advantage: all of
        those, but at most `max_fraction` of the batch (stale samples must not dominate it) and at most as many
        as the buffer holds."""
        return max(0, min(n_zero, int(max_fraction * n_samples), len(self._items)))

    def sample(self, k: int, rng: np.random.Generator | None = None, replace: bool = True
               ) -> list[tuple[T, float]]:
        """k (sample, advantage) pairs drawn with probability ∝ |advantage|, independently (with replacement)
        unless `replace=False` (then at most len(self), all distinct), from the buffer's own seeded generator
        unless `rng` is given. The buffer keeps what it returns."""
        if k <= 0 or not self._items:
            return []
        w = np.abs(np.array([a for a, _ in self._items], dtype=np.float64))
        idx = (rng or self._rng).choice(len(w), size=k if replace else min(k, len(w)), replace=replace,
                                        p=w / w.sum())
        return [(self._items[i][1], self._items[i][0]) for i in idx.tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Plain data, JSON-able when the samples are (else picklable): the items, oldest first, and the state of
        the buffer's generator."""
        return {"items": [[a, s] for a, s in self._items], "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; a smaller capacity than the saved buffer's keeps the newest items."""
        self._items = deque(((float(a), s) for a, s in state["items"]), maxlen=self.capacity)
        self._rng.bit_generator.state = state["rng"]
