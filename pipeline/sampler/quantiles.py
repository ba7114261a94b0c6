"""Weighted quantile knots: the one computation behind every cdf and cgf table."""

from __future__ import annotations

import numpy as np


def weighted_knots(values: np.ndarray, weights: np.ndarray | None, quantiles: int,
                   *, presorted: bool = False) -> np.ndarray:
    """The smallest ``u`` with (weight of values <= u) / total >= k/Q, for k = 0..Q.

    Args:
        values: (n,) floats; weights: (n,) non-negative with a positive sum, or None (all 1).
        presorted: values are already ascending (weights in the same order).

    Returns:
        (Q+1,) float64, non-decreasing; knot 0 is the smallest value of positive weight.
    """
    order = None if presorted else np.argsort(values, kind="stable")
    v = values if order is None else values[order]
    if weights is None:
        cum = np.arange(1, v.size + 1, dtype=np.float64)
    else:
        cum = np.cumsum(weights if order is None else weights[order], dtype=np.float64)
    total = cum[-1]
    # A relative slack keeps cumsum rounding from skipping a level that is reached exactly.
    levels = np.arange(quantiles + 1, dtype=np.float64) / quantiles * total * (1 - 1e-12)
    levels[0] = min(levels[0], 0.0)
    pos = np.searchsorted(cum, levels, side="left")
    if weights is not None:
        # Level 0: the first value that carries weight.
        pos[0] = np.searchsorted(cum, 0.0, side="right")
    return np.asarray(v[np.minimum(pos, v.size - 1)], dtype=np.float64)


def atoms(knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """cdf values that a whole tie group of raw values maps to: the repeated knots' levels.

    A raw value carrying more than 1/Q of the rows repeats among the knots; every row holding it
    gets the same ``f`` (the level of its last repeated knot), exactly, as a float.
    """
    runs = np.flatnonzero(np.append(knots[1:] != knots[:-1], True))
    lengths = np.diff(np.append(-1, runs))
    return levels[runs[lengths > 1]]
