"""DRLC: min-max normalisation (constant columns included) and the capped penalty, on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r1v.distill.drlc import CONSTANT_VALUE, drlc, minmax, normalise, penalty


def test_three_rows_by_hand() -> None:
    # alpha = beta = gamma = 1.
    # s_v [0, 5, 10] -> [0, .5, 1]; s_t [2, 4, 3] -> [0, 1, .5]; s_i [1, 1, 3] -> [0, 0, 1]
    # mix = (s_v + s_t + s_i) / 3 = [0, 1.5/3 = .5, 2.5/3 = 5/6]
    # P = min(2, exp(1 - mix)) = [min(2, e) = 2 (capped), e^0.5 = 1.648721, e^(1/6) = 1.181360]
    out = drlc([0, 5, 10], [2, 4, 3], [1, 1, 3], alpha=1, beta=1, gamma=1)
    np.testing.assert_allclose(out["s_v_norm"], [0, 0.5, 1])
    np.testing.assert_allclose(out["s_t_norm"], [0, 1, 0.5])
    np.testing.assert_allclose(out["s_i_norm"], [0, 0, 1])
    np.testing.assert_allclose(out["penalty"], [2.0, 1.6487212707, 1.1813604129], rtol=1e-9)
    # beta = 2, gamma = 0, alpha = 0.5: mix = (s_v + 2 s_t) / 3 = [0, 2.5/3, 2/3]
    # P = exp(0.5 (1 - mix)) = [e^0.5 = 1.648721, e^(1/12) = 1.086904, e^(1/6) = 1.181360]
    out = drlc([0, 5, 10], [2, 4, 3], [1, 1, 3], alpha=0.5, beta=2, gamma=0)
    np.testing.assert_allclose(out["penalty"], [1.6487212707, 1.0869040495, 1.1813604129], rtol=1e-9)


def test_constant_column_normalises_to_the_midpoint() -> None:
    n, lo, hi = minmax([3.0, 3.0, 3.0])
    assert CONSTANT_VALUE == 0.5 and (lo, hi) == (3.0, 3.0)
    np.testing.assert_array_equal(n, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(minmax([7.0])[0], [0.5])  # one row: constant too
    np.testing.assert_array_equal(normalise([1.0, 2.0], 4.0, 4.0), [0.5, 0.5])
    # s_v, s_t constant, s_i [0, 1]: mix = (.5 + .5 + s_i) / 3 = [1/3, 2/3]; alpha = 1: P = [e^(2/3), e^(1/3)]
    out = drlc([2, 2], [9, 9], [0, 1], alpha=1, beta=1, gamma=1)
    np.testing.assert_allclose(out["penalty"], [math.exp(2 / 3), math.exp(1 / 3)])


def test_penalty_is_capped_at_two_and_one_at_best() -> None:
    s = np.array([0.0, 0.25, 0.5, 1.0])
    p = penalty(s, s, s, alpha=10, beta=1, gamma=1)
    np.testing.assert_allclose(p, [2.0, 2.0, 2.0, 1.0])  # e^10, e^7.5, e^5 capped; all ones -> e^0 = 1
    p = penalty(s, s, s, alpha=math.log(2), beta=1, gamma=1)  # ln 2 spans [1, 2] exactly
    np.testing.assert_allclose(p, [2.0, 2 ** 0.75, 2 ** 0.5, 1.0])
    np.testing.assert_allclose(penalty(s, s, s, alpha=0, beta=1, gamma=1), 1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        penalty(s, s, s, alpha=-1, beta=1, gamma=1)


def test_normalisation_bounds() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3, 10, 1000)
    n, lo, hi = minmax(x)
    assert n.min() == 0.0 and n.max() == 1.0 and (lo, hi) == (x.min(), x.max())
    assert np.all(np.diff(n[np.argsort(x)]) >= 0)  # order kept
    np.testing.assert_allclose(normalise(x[:10], lo, hi), n[:10])  # part by part = whole
    assert minmax([])[0].size == 0
    with pytest.raises(ValueError, match="NaN"):
        minmax([1.0, float("nan")])
