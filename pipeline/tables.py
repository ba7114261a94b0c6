"""Quantile tables of the sampler's transforms (arXiv 2410.05578, §3.2, equations 6, 7 and 10).

Two kinds of knots, each at the levels ``k/Q`` for ``k = 0..Q``:

- per feature (``loss``, ``entropy_r``): the raw value at which the empirical cdf (fraction of
  rows ``<= x``) first reaches ``k/Q``; ``feature_cdf`` maps raw values to ``f`` in [0, 1];
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

Building: ``f`` is binned into a ``bins x bins`` grid whose edges follow the quantiles of an
even mix of the uniform and the weighted marginals (so no column holds more than ``2/bins`` of
either mass); each occupied cell becomes one point at its weighted centroid, and per angle the
points are sorted by ``G``. Up to ``bins**2`` rows the rows themselves are the points (exact).
Angle ``a + pi`` reuses the sort of ``a`` reversed. Tied raw values (more than 1/Q of the rows
on one value, e.g. a loss of exactly 0) map to one exact cdf value; each such tie group gets a
grid column of its own and its cells' points sit on the tied value exactly, so a tie is never
split or blended with its neighbours (a blended tie can be off by its whole mass).

Fast evaluation: ``cdf_function`` (and ``pipeline.sampler``) turn knots into
``pipeline.piecewise.Piecewise`` functions, evaluated in float32 by table lookup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from swift_sampler.storage import (
    StoreError,
    StoreLayout,
    atomic_write_json,
    atomic_write_parquet,
    read_json_object,
)
from swift_sampler.storage.schemas import CDF, CGF, FEATURE_NAMES, POINTS

from .piecewise import EPS32, Piecewise

TRANSFORM_KINDS = ("cgf", "cdf")
_FINE = 1 << 16  # resolution of the 1-D marginals used to place the grid edges


class TablesError(StoreError):
    """Tables are missing, malformed, or were built from other features."""


@dataclass(frozen=True, eq=False)
class FeatureTables:
    """Knots of the feature cdfs and of the transforms, plus the weighted points they came from.

    Attributes:
        quantiles: Q; every knot row has Q+1 non-decreasing float64 values.
        angle_count: A, the size of the full angle grid ``a_j = 2*pi*j/A``.
        cdf_knots: feature name -> (Q+1,) raw values at levels k/Q.
        angles: (m,) float64 radians in [0, 2*pi) held, ascending: the A grid angles for full
            tables; one exact angle (or two grid neighbours) in a sampler's subset.
        knots: kind ("cgf"/"cdf") -> (m, Q+1) knots of G, row i for ``angles[i]``.
        rows: number of feature rows the tables were built from.
        points: kind -> (3, p) float64 rows (f1, f2, mass): the rows (or grid-cell centroids)
            the knots were built from; lets ``transform`` compute the knots of any exact angle.
            None in a subset.
    """

    quantiles: int
    angle_count: int
    cdf_knots: Mapping[str, np.ndarray]
    angles: np.ndarray
    knots: Mapping[str, np.ndarray]
    rows: int
    points: Mapping[str, np.ndarray] | None = None
    _row: dict = field(init=False, repr=False)
    _cache: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        q, a = self.quantiles, self.angle_count
        if q < 1 or a < 2:
            raise TablesError(f"tables need quantiles >= 1 and angles >= 2, got {q}, {a}")
        for name in FEATURE_NAMES:
            if name not in self.cdf_knots:
                raise TablesError(f"tables: cdf knots of feature {name!r} missing")
        for name, k in self.cdf_knots.items():
            _check_knots(f"cdf knots of {name!r}", k, (q + 1,))
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
            (self.quantiles, self.angle_count, self.rows) == (other.quantiles, other.angle_count, other.rows)
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

    def feature_cdf(self, name: str, raw) -> np.ndarray:
        """Raw feature values (any shape, float) -> cdf in [0, 1] (float64, same shape).

        Below the smallest stored value: 0; at or above the largest: 1.
        """
        knots = self.cdf_knots.get(name)
        if knots is None:
            raise TablesError(f"no cdf knots for feature {name!r} (have {sorted(self.cdf_knots)})")
        return np.interp(np.asarray(raw, dtype=np.float64), knots, self.levels, left=0.0)

    def cdf_function(self, name: str) -> Piecewise:
        """``feature_cdf`` of ``name`` as a ``Piecewise`` (cached; ``.fast`` for float32)."""
        key = ("cdf", name)
        if key not in self._cache:
            knots = self.cdf_knots.get(name)
            if knots is None:
                raise TablesError(f"no cdf knots for feature {name!r} (have {sorted(self.cdf_knots)})")
            self._cache[key] = Piecewise.from_knots(knots, self.levels, left=0.0)
        return self._cache[key]

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

        ``f1``, ``f2``: cdf of loss and entropy_r (floats in [0, 1], any matching shape).
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

    def transform_raw(self, loss, entropy_r, c1: float, c2: float, kind: str = "cgf") -> np.ndarray:
        """Raw features -> t (``feature_cdf`` then ``transform``)."""
        return self.transform(self.feature_cdf("loss", loss), self.feature_cdf("entropy_r", entropy_r),
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
            rows=self.rows,
        )


def direction(c1: float, c2: float) -> float:
    """Angle of ``(c1, c2)`` in [0, 2*pi) (float64; the same floats give the same angle)."""
    theta = math.atan2(c2, c1) % (2 * math.pi)
    return 0.0 if theta >= 2 * math.pi else theta


def grid_angle(j: int, count: int) -> float:
    return 2 * math.pi * j / count


def _check_kind(kind: str) -> None:
    if kind not in TRANSFORM_KINDS:
        raise TablesError(f"unknown transform {kind!r} (expected one of {TRANSFORM_KINDS})")


def _same(a: Mapping, b: Mapping) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def unit(theta: float) -> tuple[float, float]:
    """(cos, sin) of ``theta`` with float dust snapped to 0, so c = (0, 1) gives G = f2 exactly."""
    u1, u2 = math.cos(theta), math.sin(theta)
    return (0.0 if abs(u1) < 1e-12 else u1), (0.0 if abs(u2) < 1e-12 else u2)


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


def _columns(f: np.ndarray, w: np.ndarray, bins: int, tied: np.ndarray):
    """Column of each row on one axis: a tie group (value in ``tied``) gets a column of its own;
    the other rows fill ``bins`` columns of at most ~2/bins of either mass (uniform, weighted).

    Returns:
        (col int64 (n,), ncols, value (ncols,) float64: the tied value, NaN for a plain column).
    """
    fine = np.minimum((f * _FINE).astype(np.int64), _FINE - 1)
    tied = np.unique(tied)
    tfine = np.minimum((tied * _FINE).astype(np.int64), _FINE - 1)
    tfine, first = np.unique(tfine, return_index=True)  # one tie group per fine cell at most
    tied = tied[first]
    lut_val = np.full(_FINE, np.nan)
    lut_val[tfine] = tied
    lut_id = np.zeros(_FINE, dtype=np.int64)
    lut_id[tfine] = np.arange(tied.size)
    is_tied = f == lut_val[fine]  # NaN never compares equal: plain fine cells give False
    plain = ~is_tied
    uni = np.bincount(fine[plain], minlength=_FINE).astype(np.float64)
    wt = np.bincount(fine[plain], weights=w[plain], minlength=_FINE)
    mix = np.cumsum(0.5 * uni / max(uni.sum(), 1.0) + 0.5 * wt / max(wt.sum(), 1e-300))
    lut = np.minimum((mix * bins - 1e-9).astype(np.int64).clip(0), bins - 1)
    col = lut[fine]
    col[is_tied] = bins + lut_id[fine[is_tied]]
    value = np.concatenate([np.full(bins, np.nan), tied])
    return col, bins + tied.size, value


def _points(f1: np.ndarray, f2: np.ndarray, w: np.ndarray, bins: int,
            tied1: np.ndarray, tied2: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted points that stand for the rows: the rows themselves, or one point per grid cell.

    A cell's point sits at its weighted centroid, except along an axis where the cell is one tie
    group: there it sits at the tied value exactly, so the tied rows' G equals the point's G
    bit for bit and the tie is kept whole (``tied1``/``tied2``: the tied cdf values, ``atoms``).
    """
    n = f1.size
    if n <= bins * bins:
        return {"cgf": np.stack([f1, f2, w]), "cdf": np.stack([f1, f2, np.ones(n)])}
    col1, n1, val1 = _columns(f1, w, bins, tied1)
    col2, n2, val2 = _columns(f2, w, bins, tied2)
    cell = col1
    cell *= n2
    cell += col2
    del col2
    size = n1 * n2
    out = {}
    for kind, weight in (("cgf", w), ("cdf", None)):
        mass = np.bincount(cell, weights=weight, minlength=size).astype(np.float64)
        s1 = np.bincount(cell, weights=f1 if weight is None else f1 * weight, minlength=size)
        s2 = np.bincount(cell, weights=f2 if weight is None else f2 * weight, minlength=size)
        keep = np.flatnonzero(mass > 0)
        m = mass[keep]
        x, y = s1[keep] / m, s2[keep] / m
        t1, t2 = val1[keep // n2], val2[keep % n2]
        x = np.where(np.isnan(t1), x, t1)
        y = np.where(np.isnan(t2), y, t2)
        out[kind] = np.stack([x, y, m])
    return out


def build_tables(loss, entropy_r, grad_norm, *, quantiles: int = 1024, angles: int = 720,
                 bins: int = 512) -> FeatureTables:
    """Build all knots from feature arrays.

    Args:
        loss, entropy_r, grad_norm: (n,) finite floats, ``grad_norm >= 0`` with a positive sum.
        quantiles: Q, knots per table minus one.
        angles: A, angles of ``c`` over the full circle.
        bins: grid cells per axis above ``bins**2`` rows (see the module docstring).

    Returns:
        ``FeatureTables`` holding every grid angle, both kinds and the points.
    """
    cols = {"loss": loss, "entropy_r": entropy_r, "grad_norm": grad_norm}
    arrays = {}
    for name, col in cols.items():
        a = np.asarray(col)
        if a.ndim != 1 or a.size == 0:
            raise TablesError(f"{name}: expected a non-empty 1-D array, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise TablesError(f"{name}: {int((~np.isfinite(a)).sum())} non-finite values; rebuild the features")
        arrays[name] = a
    n = arrays["loss"].size
    if any(a.size != n for a in arrays.values()):
        raise TablesError(f"feature columns differ in length: { {k: v.size for k, v in arrays.items()} }")
    w = arrays["grad_norm"].astype(np.float64)
    if w.min() < 0 or w.sum() <= 0:
        raise TablesError("grad_norm must be >= 0 with a positive sum for the cgf transform")
    if quantiles < 1 or angles < 2 or bins < 1:
        raise TablesError(f"need quantiles >= 1, angles >= 2, bins >= 1; got {quantiles}, {angles}, {bins}")

    cdf_knots = {name: weighted_knots(arrays[name], None, quantiles) for name in FEATURE_NAMES}
    probe = FeatureTables(quantiles, angles, cdf_knots, np.empty(0), {}, n)
    f1 = probe.feature_cdf("loss", arrays["loss"])
    f2 = probe.feature_cdf("entropy_r", arrays["entropy_r"])
    lv = probe.levels
    points = _points(f1, f2, w, bins, atoms(cdf_knots["loss"], lv), atoms(cdf_knots["entropy_r"], lv))
    del f1, f2
    knots = {kind: np.empty((angles, quantiles + 1)) for kind in TRANSFORM_KINDS}
    half = angles // 2 if angles % 2 == 0 else None
    for j in range(half if half is not None else angles):
        for kind in TRANSFORM_KINDS:
            x, y, m = points[kind]
            here, opposite = _knots_at(x, y, m, grid_angle(j, angles), quantiles)
            knots[kind][j] = here
            if half is not None:
                knots[kind][j + half] = opposite  # angle a + pi: G' = -G, the same sort reversed
    grid = np.array([grid_angle(j, angles) for j in range(angles)])
    return FeatureTables(quantiles, angles, cdf_knots, grid, knots, n, points)


def read_feature_columns(store, columns=("loss", "entropy_r", "grad_norm")) -> dict[str, np.ndarray]:
    """Feature columns of every part of the store as NumPy arrays (via pyarrow.dataset)."""
    import pyarrow.dataset as ds

    layout = StoreLayout(store).require()
    parts = layout.feature_parts()
    if not parts:
        raise TablesError(f"no feature parts in {layout.features_dir}: run "
                          "`swift-sampler pipeline build-features` first")
    table = ds.dataset([str(p) for p in parts], format="parquet").to_table(columns=list(columns))
    return {c: table[c].to_numpy() for c in columns}


def _features_info(layout: StoreLayout) -> dict:
    if not layout.features_meta.is_file():
        raise TablesError(f"{layout.features_meta} missing: features are incomplete; finish "
                          "`swift-sampler pipeline build-features` first")
    return read_json_object(layout.features_meta, "delete it and run `swift-sampler pipeline "
                            "build-features` again (finished parts are kept)")


def build_store_tables(store, *, quantiles: int = 1024, angles: int = 720, bins: int = 512) -> dict:
    """Build the tables of a store's features; write cdf.parquet, cgf.parquet, then tables.json.

    Returns:
        The ``tables.json`` content: store_id, features_checkpoint_sha256, quantiles, angles, rows.
    """
    layout = StoreLayout(store).require()
    info = _features_info(layout)
    cols = read_feature_columns(layout.root)
    t = build_tables(cols["loss"], cols["entropy_r"], cols["grad_norm"],
                     quantiles=quantiles, angles=angles, bins=bins)
    levels = t.levels
    q1 = quantiles + 1
    cdf = pa.table({
        "feature": np.repeat(np.array(FEATURE_NAMES, dtype=object), q1),
        "level": np.tile(levels, len(FEATURE_NAMES)),
        "value": np.concatenate([t.cdf_knots[f] for f in FEATURE_NAMES]),
    }, schema=CDF)
    angle_values = t.angles
    cgf = pa.table({
        "transform": np.repeat(np.array(TRANSFORM_KINDS, dtype=object), angles * q1),
        "angle": np.tile(np.repeat(angle_values, q1), len(TRANSFORM_KINDS)),
        "level": np.tile(levels, angles * len(TRANSFORM_KINDS)),
        "g": np.concatenate([t.knots[k].ravel() for k in TRANSFORM_KINDS]),
    }, schema=CGF)
    points = pa.table({
        "transform": np.concatenate([np.full(t.points[k].shape[1], k, dtype=object) for k in TRANSFORM_KINDS]),
        "f1": np.concatenate([t.points[k][0] for k in TRANSFORM_KINDS]),
        "f2": np.concatenate([t.points[k][1] for k in TRANSFORM_KINDS]),
        "mass": np.concatenate([t.points[k][2] for k in TRANSFORM_KINDS]),
    }, schema=POINTS)
    atomic_write_parquet(layout.inside(layout.cdf_table), cdf)
    atomic_write_parquet(layout.inside(layout.cgf_table), cgf)
    atomic_write_parquet(layout.inside(layout.points_table), points)
    meta = {
        "store_id": info.get("store_id"),
        "features_checkpoint_sha256": info.get("checkpoint_sha256"),
        "quantiles": quantiles, "angles": angles, "bins": bins, "rows": t.rows,
    }
    atomic_write_json(layout.inside(layout.tables_meta), meta)
    return meta


def load_tables(store) -> FeatureTables:
    """Read a store's tables; refuse tables built from other features than the current ones."""
    import pyarrow.parquet as pq

    layout = StoreLayout(store).require()
    if not layout.tables_meta.is_file():
        raise TablesError(f"{layout.tables_meta} missing: build the tables with "
                          "`swift-sampler pipeline build-features` first")
    meta = read_json_object(layout.tables_meta, "delete it and rebuild the tables with "
                      "`swift-sampler pipeline build-features` (it keeps the scored parts)")
    info = _features_info(layout)
    if meta.get("features_checkpoint_sha256") != info.get("checkpoint_sha256") or \
            meta.get("store_id") != info.get("store_id"):
        raise TablesError("tables were built from other features than those in "
                          f"{layout.features_dir} (checkpoint or store differs); rebuild the tables")
    q, a = int(meta["quantiles"]), int(meta["angles"])
    cdf = pq.read_table(layout.cdf_table)
    cgf = pq.read_table(layout.cgf_table)
    feats = cdf["feature"].to_numpy(zero_copy_only=False)
    values = cdf["value"].to_numpy()
    cdf_knots = {f: values[feats == f] for f in FEATURE_NAMES}
    kinds = cgf["transform"].to_numpy(zero_copy_only=False)
    g = cgf["g"].to_numpy()
    knots = {}
    for kind in TRANSFORM_KINDS:
        sel = g[kinds == kind]
        if sel.size != a * (q + 1):
            raise TablesError(f"{layout.cgf_table.name}: {kind} holds {sel.size} knots, expected {a}x{q + 1}")
        knots[kind] = sel.reshape(a, q + 1)
    angles = np.array([grid_angle(j, a) for j in range(a)])
    points = None
    if layout.points_table.is_file():
        pts = pq.read_table(layout.points_table)
        pk = pts["transform"].to_numpy(zero_copy_only=False)
        points = {k: np.stack([pts[c].to_numpy()[pk == k] for c in ("f1", "f2", "mass")]) for k in TRANSFORM_KINDS}
    return FeatureTables(q, a, cdf_knots, angles, knots, int(meta["rows"]), points)


__all__ = ["EPS32", "TRANSFORM_KINDS", "FeatureTables", "Piecewise", "TablesError", "build_store_tables", "build_tables",
           "direction", "grid_angle", "load_tables", "read_feature_columns", "weighted_knots"]
