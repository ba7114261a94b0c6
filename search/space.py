"""The search space of the agents: the unit cube [0,1]^dim, and points in it.

The sampler's 10 parameters are mapped to and from [0,1]^10 by
``pipeline.sampler.function.Sampler.to_point/from_point``; the agents only ever see the cube, so every
bound lives here once and every proposal is checked against it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import qmc

from swift_sampler.storage.errors import SwiftSamplerError

DIM = 10
LOWER = 0.0
UPPER = 1.0
# Float noise from arithmetic (e.g. a point that went through JSON) may step outside the cube by a
# hair; it is clipped back. Anything further out is a caller error and raises.
_TOLERANCE = 1e-9


class PointError(SwiftSamplerError, ValueError):
    """A point is not a finite vector of the cube [0,1]^dim."""


def check_point(point: object, dim: int = DIM) -> np.ndarray:
    """Validate one point of the cube and return it as a fresh float64 array.

    Args:
        point: array-like of shape ``(dim,)``.
        dim: dimension of the cube.

    Returns:
        float64 array of shape ``(dim,)`` with every coordinate in ``[0, 1]``.

    Raises:
        PointError: wrong shape, non-finite value, or a coordinate outside ``[0, 1]``.
    """
    z = np.array(point, dtype=np.float64, copy=True)
    if z.shape != (dim,):
        raise PointError(f"a point must have shape ({dim},), got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise PointError(f"a point must be finite, got {z.tolist()}")
    if z.min() < LOWER - _TOLERANCE or z.max() > UPPER + _TOLERANCE:
        raise PointError(f"a point must lie in [{LOWER}, {UPPER}]^{dim}, got {z.tolist()}")
    return np.clip(z, LOWER, UPPER)


def sobol_points(n: int, dim: int = DIM, *, seed: int = 0) -> np.ndarray:
    """The first ``n`` points of a scrambled Sobol' sequence in [0,1]^dim.

    A power-of-two block is drawn (the balanced form of the sequence) and its first ``n`` rows
    kept, so ``sobol_points(n)`` is a prefix of ``sobol_points(m)`` for ``n <= m`` within a block.

    Returns:
        float64 array of shape ``(n, dim)`` in ``[0, 1)``; the same for the same ``seed``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return np.empty((0, dim))
    m = max(0, math.ceil(math.log2(n)))
    return qmc.Sobol(d=dim, scramble=True, seed=seed).random_base2(m)[:n]


def uniform_points(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """``n`` independent uniform points of [0,1]^dim, shape ``(n, dim)``, float64."""
    return rng.uniform(LOWER, UPPER, size=(n, dim))


__all__ = ["DIM", "LOWER", "UPPER", "PointError", "check_point", "sobol_points", "uniform_points"]
