"""DRLC, the dynamic reasoning length controller (METHOD.md section 4): scores -> per-sample repetition penalty.

    P = min(2, exp(alpha * (1 - (S_v + beta*S_t + gamma*S_I) / (1 + beta + gamma))))

over scores min-max normalised across the corpus. With alpha >= 0 and scores in [0, 1], P lies in
[1, min(2, e^alpha)]: the hardest, best-integrated sample (all scores 1) gets P = 1 (no penalty: the longest
chains), the easiest one P = min(2, e^alpha) (short chains). alpha = ln 2 spans [1, 2] exactly, without the cap.
"""

from __future__ import annotations

import numpy as np

CONSTANT_VALUE = 0.5
"""What every entry of a constant column (max - min <= CONSTANT_EPS, or a single row) normalises to: the
midpoint. Why: a score with no spread over the corpus carries no information about which samples deserve
longer chains, so it should push no sample's penalty either way; 0 or 1 would silently shift every penalty."""

CONSTANT_EPS = 1e-12
PENALTY_CAP = 2.0


def minmax(x: np.ndarray | list[float]) -> tuple[np.ndarray, float, float]:
    """(x - min) / (max - min) in [0, 1], with the bounds used; a constant column gives `CONSTANT_VALUE`
    everywhere. Non-finite entries are an error (the stage quarantines rows it cannot score)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"minmax takes a 1-D column, got shape {a.shape}")
    if a.size == 0:
        return a.copy(), float("nan"), float("nan")
    if not np.isfinite(a).all():
        raise ValueError("minmax: the column has NaN or inf entries")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= CONSTANT_EPS:
        return np.full_like(a, CONSTANT_VALUE), lo, hi
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0), lo, hi


def normalise(x: np.ndarray | list[float], lo: float, hi: float) -> np.ndarray:
    """`x` normalised with bounds computed elsewhere (over the whole corpus, applied part by part)."""
    a = np.asarray(x, dtype=np.float64)
    if not (hi - lo > CONSTANT_EPS):
        return np.full_like(a, CONSTANT_VALUE)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def penalty(s_v: np.ndarray, s_t: np.ndarray, s_i: np.ndarray, alpha: float, beta: float, gamma: float,
            cap: float = PENALTY_CAP) -> np.ndarray:
    """The DRLC penalty per sample from normalised scores (vectorised); beta and gamma weight S_t and S_I."""
    if alpha < 0 or beta < 0 or gamma < 0:
        raise ValueError(f"alpha, beta, gamma must be >= 0, got {alpha}, {beta}, {gamma}")
    sv, st, si = (np.asarray(a, dtype=np.float64) for a in (s_v, s_t, s_i))
    mix = (sv + beta * st + gamma * si) / (1.0 + beta + gamma)
    return np.minimum(cap, np.exp(alpha * (1.0 - mix)))


def drlc(s_v: np.ndarray | list[float], s_t: np.ndarray | list[float], s_i: np.ndarray | list[float],
         alpha: float, beta: float, gamma: float) -> dict[str, np.ndarray]:
    """Normalise the three raw score columns over the corpus and compute the penalty: {s_v_norm, s_t_norm,
    s_i_norm, penalty}."""
    nv, _, _ = minmax(s_v)
    nt, _, _ = minmax(s_t)
    ni, _, _ = minmax(s_i)
    return {"s_v_norm": nv, "s_t_norm": nt, "s_i_norm": ni, "penalty": penalty(nv, nt, ni, alpha, beta, gamma)}
