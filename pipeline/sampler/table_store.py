"""The tables in a store: build them from its features (``tables/cdf.parquet``,
``cgf.parquet``, ``points.parquet``, then ``tables.json``) and load them back, refusing tables
built from other features. Features are read through the store's DuckDB catalog.

The tables are built for one feature pair (``pair.FeaturePair``), which ``tables.json`` records
(``features``, ``cdf_by``; a ``tables.json`` without them was built for the default pair).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from swift_sampler.storage import (
    StoreLayout,
    atomic_write_json,
    atomic_write_parquet,
    read_json_object,
    read_view,
)
from swift_sampler.storage.errors import UsageError
from swift_sampler.storage.schemas import CDF, CDF_BY_CLASS, CGF, POINTS

from .pair import DEFAULT_PAIR, FeaturePair, read_pair_columns
from .table_build import build_tables
from .transform import TRANSFORM_KINDS, FeatureTables, TablesError, grid_angle


def read_feature_columns(store, columns=("loss", "entropy_r", "grad_norm")) -> dict[str, np.ndarray]:
    """Feature columns of every part of the store as NumPy arrays, part by part in file order
    (the catalog's ``feature_parts`` view)."""
    layout = StoreLayout(store).require()
    if not layout.feature_parts():
        raise TablesError(f"no feature parts in {layout.features_dir}: run "
                          "`swift-sampler pipeline build-features` first")
    table = read_view(layout.root, "feature_parts", columns)
    return {c: table[c].to_numpy() for c in columns}


def _features_info(layout: StoreLayout) -> dict:
    if not layout.features_meta.is_file():
        raise TablesError(f"{layout.features_meta} missing: features are incomplete; finish "
                          "`swift-sampler pipeline build-features` first")
    return read_json_object(layout.features_meta, "delete it and run `swift-sampler pipeline "
                            "build-features` again (finished parts are kept)")


def build_store_tables(store, *, pair: FeaturePair = DEFAULT_PAIR, quantiles: int = 1024,
                       angles: int = 720, bins: int = 512) -> dict:
    """Build the tables of a store's features for ``pair``; write cdf.parquet, cgf.parquet,
    points.parquet, then tables.json.

    A pair with a per-image feature reads the store's training dynamics (``dynamics`` view).

    Returns:
        The ``tables.json`` content: store_id, features_checkpoint_sha256, quantiles, angles,
        bins, rows, features, cdf_by.
    """
    layout = StoreLayout(store).require()
    info = _features_info(layout)
    cols = read_pair_columns(layout.root, pair, ("grad_norm",))
    n1, n2 = pair.features
    t = build_tables(cols[n1], cols[n2], cols["grad_norm"], pair=pair, labels=cols.get("label"),
                     quantiles=quantiles, angles=angles, bins=bins)
    levels = t.levels
    q1 = quantiles + 1
    cdf = _cdf_table(t)
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
        "quantiles": quantiles, "angles": angles, "bins": bins, "rows": t.rows, **pair.record(),
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
    try:
        pair = FeaturePair.from_record(meta)
    except UsageError as e:
        raise TablesError(f"{layout.tables_meta}: {e}; rebuild the tables") from None
    q, a = int(meta["quantiles"]), int(meta["angles"])
    cdf = pq.read_table(layout.cdf_table)
    cgf = pq.read_table(layout.cgf_table)
    cdf_knots = _cdf_knots(cdf, pair, q)
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
    return FeatureTables(q, a, cdf_knots, angles, knots, int(meta["rows"]), points, pair)


def _cdf_table(t: FeatureTables) -> pa.Table:
    """cdf.parquet: rows (feature, level, value), and the label when the cdf is by class."""
    names = t.pair.features
    knots = [np.asarray(t.cdf_knots[f]).reshape(-1, t.quantiles + 1) for f in names]
    rows = [k.shape[0] for k in knots]  # 1, or one per label
    cols = {
        "feature": np.repeat(np.array(names, dtype=object), [k.size for k in knots]),
        "level": np.tile(t.levels, sum(rows)),
        "value": np.concatenate([k.ravel() for k in knots]),
    }
    if t.pair.cdf_by != "class":
        return pa.table(cols, schema=CDF)
    labels = np.concatenate([np.repeat(np.arange(r, dtype=np.int32), t.quantiles + 1) for r in rows])
    return pa.table({**cols, "label": labels}, schema=CDF_BY_CLASS)


def _cdf_knots(cdf: pa.Table, pair: FeaturePair, q: int) -> dict[str, np.ndarray]:
    feats = cdf["feature"].to_numpy(zero_copy_only=False)
    values = cdf["value"].to_numpy()
    out = {}
    for f in pair.features:
        mine = feats == f
        if pair.cdf_by != "class":
            out[f] = values[mine]
            continue
        if "label" not in cdf.column_names:
            raise TablesError("cdf.parquet holds no label column, yet tables.json says the cdf is "
                              "by class; rebuild the tables")
        labels = cdf["label"].to_numpy()[mine]
        order = np.lexsort((cdf["level"].to_numpy()[mine], labels))
        if values[mine].size % (q + 1):
            raise TablesError(f"cdf.parquet: {f} holds {values[mine].size} knots, not a multiple of {q + 1}")
        out[f] = values[mine][order].reshape(-1, q + 1)
    return out
