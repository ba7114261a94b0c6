"""Piecewise-linear functions of one variable, evaluated fast in float32.

The sampler's transforms are all of this shape: a feature cdf and ``T`` are the
piecewise-linear inverse of quantile knots (``np.interp``, ``pipeline.sampler.table_store``), ``H`` is
linear through ``(e_i, v_i)``, and ``H(T(G))`` composes to one more such function
(``Piecewise.then``), so ``tau`` costs one multiply-add and one lookup per crop.

``Piecewise`` holds such a function as right-continuous line segments (a jump's value is its
right limit, as ``np.interp`` gives with repeated knots). ``__call__`` evaluates it exactly in
float64 by ``searchsorted``; ``fast`` evaluates it in float32 through a table of 4k..1M bucket
lines (``_buckets`` sizes it from the gaps between breakpoints), falling back to the exact path
only in buckets that hold (or nearly hold) a breakpoint, or where float32 would lose precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["EPS32", "Piecewise"]

_LUT_BUCKETS = (1 << 12, 1 << 20)  # table sizes: 4k lines (32 KiB) .. 1M lines (8 MiB)
_LUT_MARGIN = 1 / 16  # buckets within this fraction of a breakpoint take the exact path
_LUT_RISE = 1e2  # |slope * x| above this loses float32 precision: exact path too
EPS32 = 2.0 ** -21  # float32 G of a tied crop lands within 3.4e-7 of its float64 knot (rounding bound)


@dataclass(frozen=True, eq=False)
class Piecewise:
    """A right-continuous piecewise-linear function of one variable (the shape of T, H, H(T)).

    On ``[starts[i], starts[i+1])`` it is ``values[i] + (x - starts[i]) * slopes[i]``; below
    ``starts[0]`` it is ``left``; from ``starts[-1]`` on it is ``values[-1]`` (``slopes[-1] == 0``).
    Jumps sit at ``starts`` (the value there is the right limit), as ``np.interp`` does with
    repeated knots.

    Attributes:
        starts: (m,) float64, strictly increasing, m >= 1.
        values, slopes: (m,) float64.
        left: value below ``starts[0]``.
    """

    starts: np.ndarray
    values: np.ndarray
    slopes: np.ndarray
    left: float
    _lut: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lut", {})

    @classmethod
    def from_knots(cls, xp, fp, left: float | None = None) -> Piecewise:
        """``np.interp(x, xp, fp, left=left)`` as a ``Piecewise`` (xp non-decreasing, repeats allowed)."""
        xp = np.asarray(xp, dtype=np.float64)
        fp = np.asarray(fp, dtype=np.float64)
        last = np.flatnonzero(np.append(xp[1:] != xp[:-1], True))  # last of each run of repeats
        starts, values = xp[last], fp[last]
        nxt = np.minimum(last + 1, xp.size - 1)
        span = xp[nxt] - xp[last]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            slopes = (fp[nxt] - fp[last]) / span
        # A segment too short for a finite slope is a jump: its start value holds on it.
        slopes[~np.isfinite(slopes)] = 0.0
        return cls(starts, values, slopes, float(fp[0] if left is None else left))

    def __call__(self, x) -> np.ndarray:
        """Exact evaluation in float64 (any shape)."""
        x = np.asarray(x, dtype=np.float64)
        i = np.searchsorted(self.starts, x, side="right") - 1
        j = np.maximum(i, 0)
        out = self.values[j] + (x - self.starts[j]) * self.slopes[j]
        out[i < 0] = self.left
        return out

    def then(self, h: Piecewise) -> Piecewise:
        """``h(self(x))`` as a ``Piecewise``; ``self`` must be non-decreasing (a cdf/cgf)."""
        s, v, k = self.starts, self.values, self.slopes
        ends = v[:-1] + k[:-1] * np.diff(s)  # left limits at starts[1:]
        t = v.copy()  # self at each breakpoint
        xs, ts = [s], [t]
        for e in h.starts:
            inside = np.flatnonzero((v[:-1] < e) & (e < ends) & (k[:-1] > 0))
            x = s[inside] + (e - v[inside]) / k[inside]
            low = x <= s[inside]  # rounding put the crossing on the start: T there is e
            t[inside[low]] = e
            keep = ~low & (x < s[inside + 1])
            xs.append(x[keep])
            ts.append(np.full(int(keep.sum()), e))
        x = np.concatenate(xs)
        t = np.concatenate(ts)
        order = np.argsort(x, kind="stable")
        x, t = x[order], t[order]
        first = np.append(True, x[1:] != x[:-1])
        x, t = x[first], t[first]
        seg = np.searchsorted(s, x, side="right") - 1
        hseg = np.maximum(np.searchsorted(h.starts, t, side="right") - 1, 0)
        below = np.searchsorted(h.starts, t, side="right") == 0
        hval = np.where(below, h.left, h.values[hseg] + (t - h.starts[hseg]) * h.slopes[hseg])
        hk = np.where(below, 0.0, h.slopes[hseg])
        return Piecewise(x, hval, hk * k[seg], float(h(np.array([self.left]))[0]))

    def fast(self, x, *, eps: float = 0.0) -> np.ndarray:
        """float32 evaluation at ``x + eps`` (any shape; float32 result, ~1e-6 off ``__call__``).

        A table of 4k..1M buckets holds the line of every bucket that no breakpoint touches; the
        crops in other buckets (and NaN) go through the exact ``searchsorted`` path. ``eps``
        counts G values a few float32 ulps below a tied knot as tied.
        """
        x = np.asarray(x)
        shape = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        lo, inv, table = self._table(eps)
        d = np.subtract(x, np.float32(lo), dtype=np.float32)
        out = np.multiply(d, np.float32(inv), dtype=np.float32)
        np.clip(out, 0, table.size - 1, out=out)
        z = table[out.astype(np.int32)]
        np.multiply(z.imag, d, out=out)
        out += z.real
        del z, d
        bad = np.flatnonzero(np.isnan(out))
        if bad.size:
            out[bad] = self(x[bad].astype(np.float64) + eps)
        return out.reshape(shape)

    def _table(self, eps: float):
        if eps not in self._lut:
            u = self.starts - eps
            lo, hi = float(u[0]), float(u[-1])
            m = _buckets(u)
            table = np.full(m, np.nan + 1j * np.nan, dtype=np.complex64)
            inv = m / (hi - lo) if hi > lo else 0.0
            if hi > lo:
                w = (hi - lo) / m
                edges = lo + np.arange(m + 1) * w
                touched = (np.searchsorted(u, edges[1:] + _LUT_MARGIN * w, side="right")
                           - np.searchsorted(u, edges[:-1] - _LUT_MARGIN * w, side="left")) > 0
                i = np.searchsorted(u, 0.5 * (edges[:-1] + edges[1:]), side="right") - 1
                reach = np.maximum(np.abs(edges[:-1] - lo), np.abs(edges[1:] - lo))
                clean = ~touched & (np.abs(self.slopes[i]) * reach <= _LUT_RISE)
                # value = values[i] + (x - u[i]) * slope = (values[i] - (u[i] - lo) * slope) + d * slope
                table[clean] = ((self.values[i] - (u[i] - lo) * self.slopes[i])
                                + 1j * self.slopes[i])[clean]
            self._lut[eps] = (lo, inv, table)
        return self._lut[eps]


def _buckets(u: np.ndarray) -> int:
    """Table size that leaves ~95% of the gaps between breakpoints at least 32 buckets wide."""
    gaps = np.diff(u)
    if gaps.size == 0 or u[-1] <= u[0]:
        return _LUT_BUCKETS[0]
    want = 32 * (u[-1] - u[0]) / max(float(np.quantile(gaps, 0.05)), 1e-300)
    return int(2 ** np.clip(np.ceil(np.log2(want)), *np.log2(_LUT_BUCKETS)))
