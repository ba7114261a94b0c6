"""The sampler's transforms of the features (arXiv 2410.05578, §3.2, equations 6, 7 and 10):
``FeatureTables`` holds their quantile knots and evaluates ``f = cdf(raw)`` and ``t = T(f)``.

Two kinds of knots, each at the levels ``k/Q`` for ``k = 0..Q``:

- per feature of the pair (``f1``, ``f2``: ``loss``, ``entropy_r`` by default, ``pair``): the raw
  value at which the empirical cdf (fraction of rows ``<= x``) first reaches ``k/Q``;
  ``feature_cdf`` maps raw values to ``f`` in [0, 1]. With ``cdf_by="class"`` there is one row of
  such knots per given label, and a row's ``f`` is its rank among the rows of its own label;
- per angle ``a_j = 2*pi*j/A`` of ``c = (c1, c2)`` and per transform kind, the value of
  ``G = cos(a)*f1 + sin(a)*f2`` at which the cumulative weight of the rows (grad norm for
  ``cgf``, equation 10; 1 per row for ``cdf``, the paper's ablation) first reaches ``k/Q``.
  ``T`` only depends on the direction of ``c``: ``G`` scales with ``|c|`` and ``T`` is a rank.

Evaluation is the piecewise-linear inverse of the knots (``np.interp``). Knots repeat where one
value carries more than ``1/Q`` of the mass (ties, a heavy row); ``np.interp`` then returns the
level of the *last* repeated knot at the value itself and interpolates from it above, which
keeps the error below ``1/Q`` on either side of the jump. ``transform`` for any ``c`` blends
the two neighbouring angles linearly in angle.

``c = (0, 0)``: ``G`` is the same constant for every row, so the exact transform (fraction of
mass with ``G <= G(x)``) is 1 for every row; ``transform`` returns 1.

Building the knots from features is ``table_build``; reading and writing them in a store is
``table_store``. Fast evaluation: ``cdf_function`` (and ``function.Sampler``) turn knots into
``piecewise.Piecewise`` functions, evaluated in float32 by table lookup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from swift_sampler.storage import StoreError

from .pair import DEFAULT_PAIR, FeaturePair, null_cdf
from .piecewise import Piecewise
from .quantiles import weighted_knots

TRANSFORM_KINDS = ("cgf", "cdf")

class TablesError(StoreError):
    """Tables are missing, malformed, or were built from other features."""


@dataclass(frozen=True, eq=False)
class FeatureTables:
    """Knots of the feature cdfs and of the transforms, plus the weighted points they came from.

    Attributes:
        quantiles: Q; every knot row has Q+1 non-decreasing float64 values.
        angle_count: A, the size of the full angle grid ``a_j = 2*pi*j/A``.
        cdf_knots: feature name -> (Q+1,) raw values at levels k/Q; ``(C, Q+1)``, one row per
            given label ``0..C-1``, when ``pair.cdf_by == "class"``.
        angles: (m,) float64 radians in [0, 2*pi) held, ascending: the A grid angles for full
            tables; one exact angle (or two grid neighbours) in a sampler's subset.
        knots: kind ("cgf"/"cdf") -> (m, Q+1) knots of G, row i for ``angles[i]``.
        rows: number of feature rows the tables were built from.
        points: kind -> (3, p) float64 rows (f1, f2, mass): the rows (or grid-cell centroids)
            the knots were built from; lets ``transform`` compute the knots of any exact angle.
            None in a subset.
        pair: the two features (``f1``, ``f2``) and how their cdf is taken.
    """

    quantiles: int
    angle_count: int
    cdf_knots: Mapping[str, np.ndarray]
    angles: np.ndarray
    knots: Mapping[str, np.ndarray]
    rows: int
    points: Mapping[str, np.ndarray] | None = None
    pair: FeaturePair = DEFAULT_PAIR
    _row: dict = field(init=False, repr=False)
    _cache: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        q, a = self.quantiles, self.angle_count
        if q < 1 or a < 2:
            raise TablesError(f"tables need quantiles >= 1 and angles >= 2, got {q}, {a}")
        if not isinstance(self.pair, FeaturePair):
            raise TablesError(f"tables: pair must be a FeaturePair, got {type(self.pair).__name__}")
        for name in self.pair.features:
            if name not in self.cdf_knots:
                raise TablesError(f"tables: cdf knots of feature {name!r} missing")
        for name, k in self.cdf_knots.items():
            if self.pair.cdf_by == "class":
                classes = np.shape(k)[0] if np.ndim(k) == 2 else 0
                if classes < 1:
                    raise TablesError(f"tables: cdf knots of {name!r} by class must have shape "
                                      f"(classes, {q + 1}), got {np.shape(k)}")
                _check_knots(f"cdf knots of {name!r}", k, (classes, q + 1))
            else:
                _check_knots(f"cdf knots of {name!r}", k, (q + 1,))
        if len({np.shape(k) for k in self.cdf_knots.values()}) > 1:
            raise TablesError("tables: the cdf knots of the two features cover different labels")
        ang = np.asarray(self.angles, dtype=np.float64)
        if ang.ndim != 1 or np.any(np.diff(ang) <= 0) or (ang.size and (ang[0] < 0 or ang[-1] >= 2 * math.pi)):
            raise TablesError("tables: angles must be ascending radians in [0, 2*pi)")
        for kind, k in self.knots.items():
            if kind not in TRANSFORM_KINDS:
                raise TablesError(f"tables: unknown transform {kind!r} (expected one of {TRANSFORM_KINDS})")
            _check_knots(f"{kind} knots", k, (ang.size, q + 1))
        for kind, p in (self.points or {}).items():
            if kind not in TRANSFORM_KINDS or np.asarray(p).ndim != 2 or np.asarray(p).shape[0] != 3:
                raise TablesError(f"tables: points of {kind!r} must have shape (3, p)")
        object.__setattr__(self, "angles", ang)
        object.__setattr__(self, "_row", {float(x): i for i, x in enumerate(ang)})
        object.__setattr__(self, "_cache", {})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureTables):
            return NotImplemented
        mine, theirs = self.points or {}, other.points or {}
        return (
            (self.quantiles, self.angle_count, self.rows, self.pair)
            == (other.quantiles, other.angle_count, other.rows, other.pair)
            and np.array_equal(self.angles, other.angles)
            and _same(self.cdf_knots, other.cdf_knots)
            and _same(self.knots, other.knots)
            and _same(mine, theirs)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def levels(self) -> np.ndarray:
        """(Q+1,) float64 levels k/Q."""
        return np.arange(self.quantiles + 1, dtype=np.float64) / self.quantiles

    def feature_cdf(self, name: str, raw, labels=None) -> np.ndarray:
        """Raw feature values (any shape, float) -> cdf in [0, 1] (float64, same shape).

        Below the smallest stored value: 0; at or above the largest: 1. ``labels`` (ints of the
        same shape: each row's given label) are needed when the cdf is taken by class. A null
        (NaN) of a per-image feature takes the feature's noisy end (``pair.null_cdf``).
        """
        knots = self._cdf_knots(name)
        raw = np.asarray(raw, dtype=np.float64)
        if knots.ndim == 1:
            f = np.interp(raw, knots, self.levels, left=0.0)
        else:
            f = np.empty(raw.shape)
            flat, out = raw.reshape(-1), f.reshape(-1)
            for c, rows in self.label_rows(labels, raw.shape):
                out[rows] = np.interp(flat[rows], knots[c], self.levels, left=0.0)
        return fill_nulls(name, raw, f)

    def cdf_function(self, name: str, label: int | None = None) -> Piecewise:
        """``feature_cdf`` of ``name`` (within ``label`` when by class) as a ``Piecewise``
        (cached; ``.fast`` for float32); nulls are not filled here (``fill_nulls``)."""
        key = ("cdf", name, label)
        if key not in self._cache:
            knots = self._cdf_knots(name)
            if (knots.ndim == 2) != (label is not None):
                raise TablesError(f"cdf of {name!r}: a label is needed exactly when the cdf is by class")
            self._cache[key] = Piecewise.from_knots(knots if label is None else knots[label],
                                                    self.levels, left=0.0)
        return self._cache[key]

    def _cdf_knots(self, name: str) -> np.ndarray:
        knots = self.cdf_knots.get(name)
        if knots is None:
            raise TablesError(f"no cdf knots for feature {name!r} (have {sorted(self.cdf_knots)})")
        return np.asarray(knots)

    def label_rows(self, labels, shape):
        """``(label, flat row indices)`` of each given label present among ``labels``."""
        if labels is None:
            raise TablesError("these tables take each feature's cdf within the given label: "
                              "pass the crops' labels")
        classes = np.shape(self._cdf_knots(self.pair.features[0]))[0]
        flat = np.broadcast_to(np.asarray(labels), shape).reshape(-1).astype(np.int64)
        return label_rows(flat, classes)

    def neighbours(self, c1: float, c2: float) -> tuple[float, float, float]:
        """Grid angles ``a_j, a_{j+1}`` around the direction of ``c`` and the blend weight."""
        theta = direction(c1, c2)
        pos = theta / (2 * math.pi) * self.angle_count
        j = min(int(math.floor(pos)), self.angle_count - 1)
        return grid_angle(j, self.angle_count), grid_angle((j + 1) % self.angle_count, self.angle_count), \
            min(max(pos - j, 0.0), 1.0)

    def exact_knots(self, kind: str, theta: float) -> np.ndarray | None:
        """(Q+1,) knots of G at angle ``theta``: held, or computed from the points; else None."""
        _check_kind(kind)
        i = self._row.get(float(theta))
        if i is not None and kind in self.knots:
            return self.knots[kind][i]
        if not self.points or kind not in self.points:
            return None
        key = (kind, float(theta))
        if key not in self._cache:
            x, y, m = self.points[kind]
            self._cache[key] = _knots_at(x, y, m, theta, self.quantiles)[0]
        return self._cache[key]

    def transform(self, f1, f2, c1: float, c2: float, kind: str = "cgf") -> np.ndarray:
        """cdf features -> t = T(c1*f1 + c2*f2) in [0, 1], float64 of the broadcast shape.

        ``f1``, ``f2``: cdf of the pair's two features (floats in [0, 1], any matching shape).
        Uses the knots of the exact direction of ``c`` when held or computable from the points;
        otherwise blends the two neighbouring grid angles. ``c = (0, 0)`` gives 1 everywhere.
        """
        _check_kind(kind)
        f1 = np.asarray(f1, dtype=np.float64)
        f2 = np.asarray(f2, dtype=np.float64)
        if c1 == 0 and c2 == 0:
            return np.ones(np.broadcast_shapes(f1.shape, f2.shape))
        theta = direction(c1, c2)
        knots = self.exact_knots(kind, theta)
        if knots is not None:
            return _angle_t(f1, f2, theta, knots, self.levels)
        a0, a1, lam = self.neighbours(c1, c2)
        t = _angle_t(f1, f2, a0, self._held(kind, a0, c1, c2), self.levels)
        if lam > 0:
            t *= 1.0 - lam
            t += lam * _angle_t(f1, f2, a1, self._held(kind, a1, c1, c2), self.levels)
        return t

    def transform_raw(self, x1, x2, c1: float, c2: float, kind: str = "cgf", labels=None) -> np.ndarray:
        """Raw values of the pair's two features -> t (``feature_cdf`` then ``transform``)."""
        n1, n2 = self.pair.features
        return self.transform(self.feature_cdf(n1, x1, labels), self.feature_cdf(n2, x2, labels),
                              c1, c2, kind)

    def _held(self, kind: str, angle: float, c1: float, c2: float) -> np.ndarray:
        i = self._row.get(float(angle))
        if i is None or kind not in self.knots:
            raise TablesError(f"tables hold neither the {kind} knots of c=({c1}, {c2}) nor its "
                              "neighbouring grid angles: they belong to another sampler")
        return self.knots[kind][i]

    def subset(self, c1: float, c2: float, kinds: tuple[str, ...] | None = None) -> FeatureTables:
        """What one sampler needs: the cdf knots and the knots of its direction of ``c``.

        The exact angle when it can be computed (full tables), else the two neighbouring grid
        angles; no angle at all for ``c = (0, 0)``. The subset holds no points.
        """
        kinds = tuple(self.knots) if kinds is None else kinds
        for kind in kinds:
            _check_kind(kind)
        rows: dict[float, dict[str, np.ndarray]] = {}
        if not (c1 == 0 and c2 == 0):
            theta = direction(c1, c2)
            for kind in kinds:
                exact = self.exact_knots(kind, theta)
                if exact is not None:
                    rows.setdefault(theta, {})[kind] = exact
                else:
                    a0, a1, _ = self.neighbours(c1, c2)
                    for a in (a0, a1):
                        rows.setdefault(a, {})[kind] = self._held(kind, a, c1, c2)
        angles = sorted(rows)
        if any(set(rows[a]) != set(kinds) for a in angles):
            raise TablesError(f"tables cannot give every transform of {kinds} at one set of angles")
        return FeatureTables(
            quantiles=self.quantiles, angle_count=self.angle_count,
            cdf_knots={k: np.array(v, dtype=np.float64) for k, v in self.cdf_knots.items()},
            angles=np.array(angles, dtype=np.float64),
            knots={k: np.array([rows[a][k] for a in angles], dtype=np.float64).reshape(
                len(angles), self.quantiles + 1) for k in kinds},
            rows=self.rows, pair=self.pair,
        )


def label_rows(labels: np.ndarray, classes: int):
    """Yield ``(label, row indices)`` of each label present in ``labels`` ((n,) ints in
    ``0..classes-1``); one stable sort instead of a mask per class."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise TablesError(f"labels outside 0..{classes - 1}, the labels the tables were built for; "
                          "rebuild the tables")
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(classes + 1))
    for c in range(classes):
        if bounds[c + 1] > bounds[c]:
            yield c, order[bounds[c]:bounds[c + 1]]


def fill_nulls(name: str, raw: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``f`` with the rows whose raw value is null (NaN) at the noisy end of a per-image feature."""
    end = null_cdf(name)
    if end is None:
        return f
    return np.where(np.isnan(raw), np.asarray(end, dtype=np.asarray(f).dtype), f)


def direction(c1: float, c2: float) -> float:
    """Angle of ``(c1, c2)`` in [0, 2*pi) (float64; the same floats give the same angle)."""
    theta = math.atan2(c2, c1) % (2 * math.pi)
    return 0.0 if theta >= 2 * math.pi else theta


def grid_angle(j: int, count: int) -> float:
    return 2 * math.pi * j / count


def unit(theta: float) -> tuple[float, float]:
    """(cos, sin) of ``theta`` with float dust snapped to 0, so c = (0, 1) gives G = f2 exactly."""
    u1, u2 = math.cos(theta), math.sin(theta)
    return (0.0 if abs(u1) < 1e-12 else u1), (0.0 if abs(u2) < 1e-12 else u2)


def _check_kind(kind: str) -> None:
    if kind not in TRANSFORM_KINDS:
        raise TablesError(f"unknown transform {kind!r} (expected one of {TRANSFORM_KINDS})")


def _same(a: Mapping, b: Mapping) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _angle_t(f1: np.ndarray, f2: np.ndarray, theta: float, knots: np.ndarray, levels: np.ndarray) -> np.ndarray:
    u1, u2 = unit(theta)
    g = u1 * f1 + u2 * f2
    return np.interp(g, knots, levels, left=0.0)


def _knots_at(x: np.ndarray, y: np.ndarray, m: np.ndarray, theta: float, quantiles: int):
    """Knots of G at ``theta`` and at ``theta + pi`` (same sort, reversed)."""
    u1, u2 = unit(theta)
    g = u1 * x + u2 * y
    order = np.argsort(g)  # ties need no order: a knot is a value of G, not a row
    gs, ms = g[order], m[order]
    return (weighted_knots(gs, ms, quantiles, presorted=True),
            weighted_knots(-gs[::-1], ms[::-1], quantiles, presorted=True))


def _check_knots(what: str, k, shape: tuple[int, ...]) -> None:
    k = np.asarray(k)
    if k.shape != shape:
        raise TablesError(f"tables: {what} must have shape {shape}, got {k.shape}")
    if k.size and (not np.all(np.isfinite(k)) or np.any(np.diff(k, axis=-1) < 0)):
        raise TablesError(f"tables: {what} must be finite and non-decreasing")
