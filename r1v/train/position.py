"""SFT's data position within an epoch, kept as global row indices so that it does not depend on the workers.

Every rank records the rows it hands to training (their global index, `row`, and whether they were quarantined)
since the last checkpoint; at a checkpoint or an epoch's end the ranks' records are gathered and rank 0 appends
them to the epoch's: the consumed rows (in the order they were merged, with the rank and the segment, i.e. the
worker group's start within the epoch, that took each), the trained count and the quarantine records. That is
what a checkpoint stores, and a resumed epoch splits the rows not consumed yet over however many workers it has.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r1v.train.engine import gather_objects


class EpochRows:
    """The rows an epoch has consumed. All ranks hold those of the checkpoint it resumed from (to know what
    remains); rank 0 also merges what every rank consumed since."""

    def __init__(self, corpus_rows: int, rank: int, state: dict[str, Any] | None = None,
                 arrays: dict[str, np.ndarray] | None = None) -> None:
        state, arrays = state or {}, arrays or {}
        if state.get("corpus_rows", corpus_rows) != corpus_rows:
            raise RuntimeError(f"the checkpoint's data position is over a corpus of {state['corpus_rows']} rows, the "
                               f"corpus now has {corpus_rows}: its row indices would name other rows")
        self.corpus_rows, self.rank = corpus_rows, rank
        self.rows = arrays.get("rows", np.zeros(0, np.int64)).astype(np.int64)
        self.ranks = arrays.get("rows_rank", np.zeros(0, np.int16)).astype(np.int16)
        self.segments = arrays.get("rows_segment", np.zeros(0, np.int16)).astype(np.int16)
        self.trained: int = state.get("trained", 0)
        self.quarantined: list[dict[str, Any]] = list(state.get("quarantined", []))
        # An epoch resumed after some of its rows is a new segment (its windows are formed anew from the rest); an
        # epoch started from its beginning, resumed or not, is segment 0.
        self.segment: int = state.get("segment", 0) + 1 if len(self.rows) else 0
        self._new: list[int] = []
        self._new_trained = 0
        self._new_bad: list[dict[str, Any]] = []

    def remaining(self, order: np.ndarray) -> np.ndarray:
        """`order` (the epoch's global row order) without the consumed rows."""
        return order[~np.isin(order, self.rows)]

    def count(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record a micro-step's rows as consumed; returns the ones to train on (the rest are quarantined)."""
        good = [r for r in rows if not r["error"]]
        self._new_bad += [{"id": r["id"], "reason": r["error"], "detail": r["detail"], "source": r["source"]}
                          for r in rows if r["error"]]
        self._new += [r["row"] for r in rows]
        self._new_trained += len(good)
        return good

    def merge(self) -> None:
        """Gather every rank's records since the last merge into rank 0's; every rank calls it. Raises if a row
        was consumed twice: the position would then be wrong."""
        parts = gather_objects((self._new, self._new_trained, self._new_bad))
        self._new, self._new_trained, self._new_bad = [], 0, []
        if self.rank != 0:
            return
        new = [np.asarray(rows, dtype=np.int64) for rows, _, _ in parts]
        merged = np.concatenate([self.rows, *new])
        if len(np.unique(merged)) != len(merged) or (merged.size and (merged.min() < 0 or
                                                                       merged.max() >= self.corpus_rows)):
            raise RuntimeError("a corpus row was consumed twice in one epoch (or is out of range): the data "
                               "position is inconsistent")
        self.rows = merged
        self.ranks = np.concatenate([self.ranks, *[np.full(len(r), k, np.int16) for k, r in enumerate(new)]])
        self.segments = np.concatenate([self.segments, np.full(len(merged) - len(self.segments), self.segment,
                                                               np.int16)])
        self.trained += sum(t for _, t, _ in parts)
        self.quarantined += [q for _, _, bad in parts for q in bad]

    def state(self) -> dict[str, Any]:
        """The JSON side of rank 0's record (after `merge`)."""
        return {"trained": self.trained, "quarantined": self.quarantined, "segment": self.segment,
                "corpus_rows": self.corpus_rows}

    def arrays(self) -> dict[str, np.ndarray]:
        """The array side of rank 0's record (after `merge`)."""
        return {"rows": self.rows, "rows_rank": self.ranks, "rows_segment": self.segments}
