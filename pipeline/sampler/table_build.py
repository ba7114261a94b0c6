"""Build ``FeatureTables`` from feature arrays: the grid of weighted points, then per angle the
knots of ``G`` (arXiv 2410.05578, §3.2).

``f`` is binned into a ``bins x bins`` grid whose edges follow the quantiles of an even mix of
the uniform and the weighted marginals (so no column holds more than ``2/bins`` of either
mass); each occupied cell becomes one point at its weighted centroid, and per angle the points
are sorted by ``G``. Up to ``bins**2`` rows the rows themselves are the points (exact). Angle
``a + pi`` reuses the sort of ``a`` reversed. Tied raw values (more than 1/Q of the rows on one
value, e.g. a loss of exactly 0) map to one exact cdf value; each such tie group gets a grid
column of its own and its cells' points sit on the tied value exactly, so a tie is never split
or blended with its neighbours (a blended tie can be off by its whole mass). The nulls of a
per-image feature are such a tie too: they all sit at its noisy end (``pair``).

The features are a ``pair.FeaturePair``; under ``cdf_by="class"`` each feature's knots are taken
per given label (a label without rows gets the global knots, so every label has a row).
"""

from __future__ import annotations

import numpy as np

from .pair import CROP_FEATURES, DEFAULT_PAIR, FeaturePair, null_cdf
from .quantiles import atoms, weighted_knots
from .transform import (
    TRANSFORM_KINDS,
    FeatureTables,
    TablesError,
    _knots_at,
    grid_angle,
    label_rows,
)

_FINE = 1 << 16  # resolution of the 1-D marginals used to place the grid edges

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


def build_tables(x1, x2, grad_norm, *, pair: FeaturePair = DEFAULT_PAIR, labels=None,
                 quantiles: int = 1024, angles: int = 720, bins: int = 512) -> FeatureTables:
    """Build all knots from feature arrays.

    Args:
        x1, x2: (n,) raw values of the pair's two features (``loss``, ``entropy_r`` by default):
            finite floats; a per-image feature may hold NaN for the nulls of images the run
            never trained on (they rank as its noisiest, ``pair.null_cdf``).
        grad_norm: (n,) finite floats ``>= 0`` with a positive sum: each row's cgf weight.
        pair: the features and how their cdf is taken.
        labels: (n,) ints >= 0, each row's given label; needed for ``cdf_by="class"`` only.
        quantiles: Q, knots per table minus one.
        angles: A, angles of ``c`` over the full circle.
        bins: grid cells per axis above ``bins**2`` rows (see the module docstring).

    Returns:
        ``FeatureTables`` holding every grid angle, both kinds and the points.
    """
    n1, n2 = pair.features
    cols = {n1: x1, n2: x2, "grad_norm": grad_norm}
    arrays = {}
    for name, col in ((n1, x1), (n2, x2), ("weight", grad_norm)):
        a = np.asarray(col)
        what = "grad_norm" if name == "weight" else name
        if a.ndim != 1 or a.size == 0:
            raise TablesError(f"{what}: expected a non-empty 1-D array, got shape {a.shape}")
        bad = ~np.isfinite(a) if null_cdf(name) is None else np.isinf(a)
        if bad.any():
            raise TablesError(f"{what}: {int(bad.sum())} non-finite values; rebuild the features")
        if np.isnan(a).all():
            raise TablesError(f"{what}: no value at all (every row is null)")
        arrays[name] = a
    n = arrays[n1].size
    if any(a.size != n for a in arrays.values()):
        raise TablesError(f"feature columns differ in length: { {k: np.size(v) for k, v in cols.items()} }")
    w = arrays["weight"].astype(np.float64)
    if w.min() < 0 or w.sum() <= 0:
        raise TablesError("grad_norm must be >= 0 with a positive sum for the cgf transform")
    if quantiles < 1 or angles < 2 or bins < 1:
        raise TablesError(f"need quantiles >= 1, angles >= 2, bins >= 1; got {quantiles}, {angles}, {bins}")
    if pair.cdf_by == "class":
        labels = _check_labels(labels, n)

    cdf_knots = {name: _cdf_knots(arrays[name], labels if pair.cdf_by == "class" else None, quantiles)
                 for name in pair.features}
    probe = FeatureTables(quantiles, angles, cdf_knots, np.empty(0), {}, n, pair=pair)
    f1 = probe.feature_cdf(n1, arrays[n1], labels)
    f2 = probe.feature_cdf(n2, arrays[n2], labels)
    points = _points(f1, f2, w, bins, _tied(probe, n1, arrays[n1]), _tied(probe, n2, arrays[n2]))
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
    return FeatureTables(quantiles, angles, cdf_knots, grid, knots, n, points, pair)


def _check_labels(labels, n: int) -> np.ndarray:
    if labels is None:
        raise TablesError("a cdf by class needs each row's given label")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise TablesError(f"labels: expected ({n},) integers >= 0, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _cdf_knots(values: np.ndarray, labels: np.ndarray | None, quantiles: int) -> np.ndarray:
    """(Q+1,) knots over the rows with a value, or (C, Q+1), one row per label ``0..max``."""
    has = ~np.isnan(values) if values.dtype.kind == "f" else None
    if has is not None and has.all():
        has = None  # no null: the rows as they are (the paper's features never have one)
    overall = weighted_knots(values if has is None else values[has], None, quantiles)
    if labels is None:
        return overall
    out = np.repeat(overall[None, :], int(labels.max()) + 1, axis=0)
    for c, rows in label_rows(labels, out.shape[0]):
        mine = values[rows] if has is None else values[rows][has[rows]]
        if mine.size:
            out[c] = weighted_knots(mine, None, quantiles)
    return out


def _tied(tables: FeatureTables, name: str, raw: np.ndarray) -> np.ndarray:
    """cdf values that a tie group maps to (``atoms`` of every row of knots), and the nulls' end."""
    knots = np.asarray(tables.cdf_knots[name])
    tied = [atoms(k, tables.levels) for k in knots.reshape(-1, knots.shape[-1])]
    if name not in CROP_FEATURES and np.isnan(raw).any():
        tied.append(np.array([null_cdf(name)]))
    return np.concatenate(tied) if len(tied) > 1 else tied[0]
