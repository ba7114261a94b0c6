"""The sampler: ``tau = H(T(c1*cdf(f1) + c2*cdf(f2)))`` (arXiv 2410.05578, §3.2, equations 4-10).

``(f1, f2)`` is the feature pair of its tables (``pair.FeaturePair``): the paper's
``(loss, E^r)`` by default. Under a cdf by class, ``tau`` needs each crop's given label.

``H`` is piecewise linear through ``(e_s, v_s)``, ``s = 0..4``, with ``e0 = 0``, ``e4 = 1``.
Where endpoints repeat (``e1 == e2``) ``H`` jumps and takes the value of the last repeated
endpoint (it is right-continuous), in NumPy and torch alike.

The search sees a sampler as a point ``z`` of [0,1]^10 (``to_point``/``from_point``):
``z[0:3]`` -> ``e1..e3`` (sorted, so any point is feasible), ``z[3:8]`` -> ``v0..v4``,
``z[8:10]`` -> ``c = 2*z - 1``. ``from_point(to_point(s))`` equals ``s`` up to float rounding
of ``c`` (``(c+1)/2*2-1``); a sorted point maps back to itself the same way.

Speed: ``tau`` and ``tau_from_cdf`` compute in float32 by default. ``H(T(.))`` is one
piecewise-linear function of ``G`` (``Piecewise.then``), so tau is ``G = c1*f1 + c2*f2`` in
place plus one table lookup (``Piecewise.fast``); ``precise=True`` gives the float64 chain of
``np.interp`` calls. The two agree within ~1e-5 except where a G lies within ~1e-6 of a jump
of ``H(T(.))`` (float32 counts such a G as tied with the jump: ``tables.EPS32``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from swift_sampler.storage.errors import SwiftSamplerError

from .pair import DEFAULT_PAIR, FeaturePair, null_cdf
from .piecewise import EPS32, Piecewise
from .transform import TRANSFORM_KINDS, FeatureTables, fill_nulls, unit

# One declaration of every bound (cf. scikit-learn's ``_parameter_constraints``).
PARAMETERS = ("e1", "e2", "e3", "v0", "v1", "v2", "v3", "v4", "c1", "c2")  # point order
BOUNDS: dict[str, tuple[float, float]] = {
    **{f"e{s}": (0.0, 1.0) for s in (1, 2, 3)},  # and e0 = 0 <= e1 <= e2 <= e3 <= e4 = 1
    **{f"v{s}": (0.0, 1.0) for s in range(5)},
    "c1": (-1.0, 1.0),
    "c2": (-1.0, 1.0),
}
TRANSFORMS = TRANSFORM_KINDS  # "cgf" (grad-norm weighted, eq. 10) or "cdf" (uniform weights, ablation)
SEGMENTS = 4


class SamplerError(SwiftSamplerError, ValueError):
    """A sampler's parameters or tables are invalid; the message names the field."""


@dataclass(frozen=True)
class Sampler:
    """Ten numbers, a transform and the tables that give ``T``.

    Attributes:
        endpoints: (e0, e1, e2, e3, e4) with e0 = 0 <= e1 <= e2 <= e3 <= e4 = 1.
        values: (v0, ..., v4), each in [0, 1].
        c1, c2: coefficients of cdf(f1) and cdf(f2) (``pair``), each in [-1, 1].
        transform: "cgf" or "cdf".
        tables: ``FeatureTables`` (full, or the sampler's subset); may be None only when
            ``c1 == c2 == 0`` (then ``t = 1`` for every crop and no table is needed).
    """

    endpoints: tuple[float, ...]
    values: tuple[float, ...]
    c1: float
    c2: float
    transform: str = "cgf"
    tables: FeatureTables | None = None

    def __post_init__(self) -> None:
        e = tuple(float(x) for x in self.endpoints)
        v = tuple(float(x) for x in self.values)
        object.__setattr__(self, "endpoints", e)
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "c1", float(self.c1))
        object.__setattr__(self, "c2", float(self.c2))
        check_parameters(self.parameters(), endpoints=e, values=v)
        if self.transform not in TRANSFORMS:
            raise SamplerError(f"transform: unknown {self.transform!r} (expected one of {TRANSFORMS})")
        if self.tables is None:
            if not (self.c1 == 0 and self.c2 == 0):
                raise SamplerError("tables: missing; a sampler with c != (0, 0) needs the feature tables")
        elif not isinstance(self.tables, FeatureTables):
            raise SamplerError(f"tables: expected FeatureTables, got {type(self.tables).__name__}")

    @property
    def pair(self) -> FeaturePair:
        """The two features the sampler reads (its tables'; the default pair without tables)."""
        return DEFAULT_PAIR if self.tables is None else self.tables.pair

    def parameters(self) -> dict[str, float]:
        """The 10 numbers by name (``PARAMETERS`` order)."""
        e, v = self.endpoints, self.values
        named = {f"e{s}": e[s] for s in (1, 2, 3) if s < len(e)}
        named.update({f"v{s}": x for s, x in enumerate(v)})
        named.update(c1=self.c1, c2=self.c2)
        return named

    # -- tau -------------------------------------------------------------------------------
    def t_from_cdf(self, f1, f2) -> np.ndarray:
        """cdf features -> ``t = T(c1*f1 + c2*f2)`` (float64)."""
        if self.c1 == 0 and self.c2 == 0:
            return np.ones(np.broadcast_shapes(np.shape(f1), np.shape(f2)))
        return self.tables.transform(f1, f2, self.c1, self.c2, self.transform)

    def tau_from_cdf(self, f1, f2, *, precise: bool = False) -> np.ndarray:
        """Precomputed cdf(f1), cdf(f2) (float arrays in [0, 1]) -> tau in [0, 1].

        Returns float32 (float64 with ``precise=True``) of the broadcast shape.
        """
        if precise:
            return self.h(self.t_from_cdf(f1, f2))
        shape = np.broadcast_shapes(np.shape(f1), np.shape(f2))
        if self.c1 == 0 and self.c2 == 0:
            return np.full(shape, self.values[-1], dtype=np.float32)
        if self._composite is None:  # blended angles: no single T to compose with H
            return self.h(self.t_from_cdf(f1, f2)).astype(np.float32)
        u1, u2, composite = self._composite
        f1 = np.asarray(f1, dtype=np.float32)
        f2 = np.asarray(f2, dtype=np.float32)
        if f1.shape != shape or f2.shape != shape:
            f1, f2 = np.broadcast_arrays(f1, f2)
        g = np.multiply(f1, np.float32(u1), dtype=np.float32)
        if u2 != 0:
            g += np.multiply(f2, np.float32(u2), dtype=np.float32)
        return composite.fast(g, eps=EPS32)

    def tau(self, x1, x2, *, labels=None, precise: bool = False) -> np.ndarray:
        """Raw values of the pair's two features (float arrays of one shape) -> tau in [0, 1].

        ``labels``: each crop's given label (ints, same shape), needed when the cdf is taken
        by class. Returns float32 (float64 with ``precise=True``). float32 input (as stored)
        takes the fast path throughout; other input gets its cdf in float64 first.
        """
        if self.c1 == 0 and self.c2 == 0:
            shape = np.broadcast_shapes(np.shape(x1), np.shape(x2))
            return self.h(np.ones(shape)) if precise else np.full(shape, self.values[-1], dtype=np.float32)
        tab = self.tables
        n1, n2 = tab.pair.features
        if precise:
            return self.tau_from_cdf(tab.feature_cdf(n1, x1, labels), tab.feature_cdf(n2, x2, labels),
                                     precise=True)
        return self.tau_from_cdf(self._cdf(n1, x1, labels), self._cdf(n2, x2, labels))

    def tau_columns(self, columns, *, precise: bool = False) -> np.ndarray:
        """``tau`` of rows given as columns (``pair.read_pair_columns``): the pair's two
        features, and ``label`` when the cdf is by class."""
        n1, n2 = self.pair.features
        labels = columns["label"] if self.pair.cdf_by == "class" else None
        return self.tau(columns[n1], columns[n2], labels=labels, precise=precise)

    def _cdf(self, name: str, raw, labels) -> np.ndarray:
        raw = np.asarray(raw)
        if raw.dtype != np.float32:
            return self.tables.feature_cdf(name, raw, labels).astype(np.float32)
        x = raw
        if null_cdf(name) is not None:
            x = np.where(np.isnan(raw), np.float32(0), raw)  # the table lookup takes no NaN
        if self.tables.pair.cdf_by != "class":
            return fill_nulls(name, raw, self.tables.cdf_function(name).fast(x))
        f = np.empty(raw.shape, dtype=np.float32)
        flat, out = x.reshape(-1), f.reshape(-1)
        for c, rows in self.tables.label_rows(labels, raw.shape):
            out[rows] = self.tables.cdf_function(name, c).fast(flat[rows])
        return fill_nulls(name, raw, f)

    @cached_property
    def _composite(self) -> tuple[float, float, Piecewise] | None:
        """(u1, u2, H(T(.))) for the exact direction of c, or None when T blends two angles."""
        theta = _direction(self.c1, self.c2)
        knots = self.tables.exact_knots(self.transform, theta)
        if knots is None:
            return None
        t = Piecewise.from_knots(knots, self.tables.levels, left=0.0)
        u1, u2 = unit(theta)
        return u1, u2, t.then(Piecewise.from_knots(self.endpoints, self.values))

    def h(self, t) -> np.ndarray:
        """The piecewise-linear H of equation 8 at ``t`` in [0, 1]."""
        return np.interp(np.asarray(t, dtype=np.float64), self.endpoints, self.values)

    def tau_torch(self, x1, x2, *, labels=None, dtype=None):
        """torch twin of ``tau`` (same numbers); runs on the device of ``x1``.

        Args:
            x1, x2: the pair's two features, tensors of one shape (any float dtype, any device);
                per-crop features only (``pair.ONLINE_FEATURES``): no nulls.
            labels: each crop's given label (int tensor, same shape) when the cdf is by class.
            dtype: compute dtype (default float64; float32 is faster on a GPU, ~1e-6 off).

        Returns:
            tau as a tensor of ``dtype`` on the same device.
        """
        import torch

        dtype = dtype or torch.float64
        dev = x1.device
        if self.c1 == 0 and self.c2 == 0:
            t = torch.ones(torch.broadcast_shapes(x1.shape, x2.shape), dtype=dtype, device=dev)
            return _interp_torch(t, self.endpoints, self.values)
        tab = self.tables
        levels = tab.levels
        n1, n2 = tab.pair.features
        f1 = _cdf_torch(tab, n1, x1.to(dtype), labels)
        f2 = _cdf_torch(tab, n2, x2.to(dtype), labels)
        theta = _direction(self.c1, self.c2)
        knots = tab.exact_knots(self.transform, theta)
        if knots is not None:
            t = _angle_t_torch(f1, f2, theta, knots, levels)
        else:
            a0, a1, lam = tab.neighbours(self.c1, self.c2)
            t = (1 - lam) * _angle_t_torch(f1, f2, a0, tab._held(self.transform, a0, self.c1, self.c2), levels)
            if lam > 0:
                t = t + lam * _angle_t_torch(f1, f2, a1, tab._held(self.transform, a1, self.c1, self.c2), levels)
        return _interp_torch(t, self.endpoints, self.values)

    # -- the search's view -----------------------------------------------------------------
    def to_point(self) -> np.ndarray:
        """(10,) float64 point of [0,1]^10 (see the module docstring)."""
        e, v = self.endpoints, self.values
        return np.array([e[1], e[2], e[3], *v, (self.c1 + 1) / 2, (self.c2 + 1) / 2], dtype=np.float64)

    @classmethod
    def from_point(cls, z, tables: FeatureTables | None, transform: str = "cgf") -> Sampler:
        """The sampler of point ``z`` (shape (10,), each in [0, 1]); endpoints get sorted."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape != (len(PARAMETERS),):
            raise SamplerError(f"point: expected shape ({len(PARAMETERS)},), got {z.shape}")
        for name, x in zip(PARAMETERS, z):
            if not (0.0 <= x <= 1.0):
                raise SamplerError(f"point: {name} coordinate {x!r} outside [0, 1]")
        e = np.sort(z[0:3])
        c1, c2 = (2 * z[8:10] - 1).clip(-1, 1)
        return cls((0.0, *e.tolist(), 1.0), tuple(z[3:8].tolist()), float(c1), float(c2), transform, tables)

    def with_tables(self, tables: FeatureTables | None) -> Sampler:
        return Sampler(self.endpoints, self.values, self.c1, self.c2, self.transform, tables)

    def embedded(self) -> Sampler:
        """The same sampler holding only its tables subset (for a sampler file)."""
        if self.tables is None:
            return self
        return self.with_tables(self.tables.subset(self.c1, self.c2, (self.transform,)))


def check_parameters(params: dict[str, float], *, endpoints=None, values=None) -> None:
    """Raise ``SamplerError`` naming the first parameter that breaks ``BOUNDS`` or the order."""
    if endpoints is not None and len(endpoints) != SEGMENTS + 1:
        raise SamplerError(f"endpoints: expected {SEGMENTS + 1} values e0..e4, got {len(endpoints)}")
    if values is not None and len(values) != SEGMENTS + 1:
        raise SamplerError(f"values: expected {SEGMENTS + 1} values v0..v4, got {len(values)}")
    for name in PARAMETERS:
        if name not in params:
            raise SamplerError(f"{name}: missing")
        x = params[name]
        lo, hi = BOUNDS[name]
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            raise SamplerError(f"{name}: {x!r} is not a number (expected one in [{lo}, {hi}])")
        if not math.isfinite(x) or not lo <= x <= hi:
            raise SamplerError(f"{name}: {x!r} is outside [{lo}, {hi}]")
    if endpoints is not None and (endpoints[0] != 0.0 or endpoints[-1] != 1.0):
        raise SamplerError(f"endpoints: e0 must be 0 and e4 must be 1, got {endpoints[0]!r}, {endpoints[-1]!r}")
    e = [0.0, params["e1"], params["e2"], params["e3"], 1.0]
    for s in range(1, 4):
        if e[s] > e[s + 1]:
            raise SamplerError(f"e{s}: endpoints must be sorted (e{s}={e[s]!r} > e{s + 1}={e[s + 1]!r})")


def uniform_sampler(tables: FeatureTables | None = None, transform: str = "cgf") -> Sampler:
    """tau = 1 for every crop (all values 1): the filter then keeps candidates uniformly."""
    return Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1.0,) * 5, 0.0, 0.0, transform, tables)


UNIFORM = uniform_sampler()


def _direction(c1: float, c2: float) -> float:
    from .transform import direction

    return direction(c1, c2)


def _interp_torch(x, xp, fp, left=None):
    """``np.interp`` in torch with the same tie rule (last repeated knot wins at the knot)."""
    import torch

    xp = torch.as_tensor(np.asarray(xp, dtype=np.float64), dtype=x.dtype, device=x.device)
    fp = torch.as_tensor(np.asarray(fp, dtype=np.float64), dtype=x.dtype, device=x.device)
    n = xp.numel()
    i = torch.searchsorted(xp, x.contiguous(), right=True)  # knots <= x
    lo = (i - 1).clamp(0, n - 1)
    hi = i.clamp(0, n - 1)
    x0, x1, y0, y1 = xp[lo], xp[hi], fp[lo], fp[hi]
    span = x1 - x0
    frac = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))
    out = y0 + frac * (y1 - y0)
    out = torch.where(i == 0, torch.full_like(out, float(fp[0]) if left is None else left), out)
    return torch.where(i >= n, fp[-1].expand_as(out), out)


def _cdf_torch(tab: FeatureTables, name: str, x, labels):
    """``FeatureTables.feature_cdf`` in torch (per-crop features: no nulls to fill)."""
    import torch

    knots = np.asarray(tab.cdf_knots[name])
    if knots.ndim == 1:
        return _interp_torch(x, knots, tab.levels, left=0.0)
    if labels is None:
        raise SamplerError("this sampler's cdf is taken within each given label: pass the labels")
    out = torch.empty_like(x)
    for c in torch.unique(labels).tolist():
        if not 0 <= c < knots.shape[0]:
            raise SamplerError(f"label {c} has no cdf knots (the tables know labels 0..{knots.shape[0] - 1})")
        mine = labels == c
        out[mine] = _interp_torch(x[mine], knots[c], tab.levels, left=0.0)
    return out


def _angle_t_torch(f1, f2, theta: float, knots, levels):
    from .transform import unit

    u1, u2 = unit(theta)
    return _interp_torch(u1 * f1 + u2 * f2, knots, levels, left=0.0)


__all__ = ["BOUNDS", "PARAMETERS", "SEGMENTS", "TRANSFORMS", "UNIFORM", "Sampler", "SamplerError",
           "check_parameters", "uniform_sampler"]
