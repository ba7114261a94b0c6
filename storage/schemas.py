"""Arrow schemas of every table in a store, in one place.

Ground-truth columns (``true_label``, ``noisy``) exist only in ``SAMPLES`` and are for
diagnostics: no feature, table, agent or loader reads them.
"""

from __future__ import annotations

import pyarrow as pa

# One row per ingested sample; written by ingest as samples.parquet.
SAMPLES = pa.schema(
    [
        ("split", pa.string()),
        ("index", pa.int64()),  # dense per split, 0..n-1
        ("key", pa.string()),  # WebDataset __key__
        ("shard", pa.int32()),  # shard number within the split
        ("source", pa.string()),  # where the sample came from (relative path or id)
        ("label", pa.int32()),  # the label used for training (possibly noisy)
        ("true_label", pa.int32()),  # diagnostics only
        ("noisy", pa.bool_()),  # diagnostics only
    ]
)
GROUND_TRUTH_COLUMNS = ("true_label", "noisy")

# One row per (train sample, crop); written by build-features as features/part-*.parquet.
FEATURES = pa.schema(
    [
        ("index", pa.int64()),
        ("crop", pa.int16()),
        ("top", pa.int16()),
        ("left", pa.int16()),
        ("height", pa.int16()),
        ("width", pa.int16()),
        ("flip", pa.bool_()),
        ("label", pa.int32()),
        ("loss", pa.float32()),
        ("entropy_r", pa.float32()),
        ("grad_norm", pa.float32()),
    ]
)

# tables/cdf.parquet: per feature, Q+1 knots (value at quantile level); with the cdf taken
# within each given label, per feature and label (``CDF_BY_CLASS``).
CDF = pa.schema([("feature", pa.string()), ("level", pa.float64()), ("value", pa.float64())])
CDF_BY_CLASS = CDF.append(pa.field("label", pa.int32()))

# tables/cgf.parquet: per transform and angle of (c1, c2), Q+1 knots of G at levels k/Q.
CGF = pa.schema(
    [
        ("transform", pa.string()),  # "cgf" (grad-norm weighted) or "cdf" (uniform weights)
        ("angle", pa.float64()),  # radians in [0, 2*pi)
        ("level", pa.float64()),
        ("g", pa.float64()),
    ]
)

# searches/<name>/trials.parquet: one row per finished trial.
TRIALS = pa.schema(
    [
        ("trial", pa.int32()),
        ("point", pa.list_(pa.float64(), 10)),
        ("e1", pa.float64()),
        ("e2", pa.float64()),
        ("e3", pa.float64()),
        ("v0", pa.float64()),
        ("v1", pa.float64()),
        ("v2", pa.float64()),
        ("v3", pa.float64()),
        ("v4", pa.float64()),
        ("c1", pa.float64()),
        ("c2", pa.float64()),
        ("score", pa.float64()),
        ("status", pa.string()),  # "ok" or "failed"
        ("epochs", pa.int32()),
        ("seconds", pa.float64()),
        ("seed", pa.int64()),
        ("kept_fraction", pa.float64()),
        ("flipped_kept_share", pa.float64()),  # diagnostics only: never shown to the agent
        # "search" (asked by the agent), "noise" (the uniform sampler again, on another seed, to
        # measure the inner loop's noise) or "guard" (a candidate re-evaluated on common seeds)
        ("phase", pa.string()),
    ]
)

# tables/points.parquet: the weighted (f1, f2) points behind the cgf/cdf knots (the rows
# themselves for small stores, one point per cell of a fine grid otherwise), from which the
# knots of any exact direction of (c1, c2) are computed.
POINTS = pa.schema(
    [("transform", pa.string()), ("f1", pa.float64()), ("f2", pa.float64()), ("mass", pa.float64())]
)
