"""The two features a sampler combines, ``G = c1*f1 + c2*f2``, and where each lives in a store.

The one place that knows which features exist:

- per crop (``CROP_FEATURES``, the ``feature_parts`` view: one value per stored crop, scored by
  the features' checkpoint): ``loss``, ``entropy_r``, ``grad_norm``;
- per image (``IMAGE_FEATURES``, the ``dynamics`` view: statistics of the run that trained the
  features' checkpoint, ``swift_sampler.train.dynamics``): every crop of an image takes its
  image's value. The cgf tables stay over crops, each weighted by its own grad norm.

``(loss, entropy_r)`` is the paper's pair and the default. ``cdf_by="class"`` takes each
feature's cdf among the crops of the same given (training) label, so that a class whose images
are all hard is not ranked below every other class wholesale.

Nulls: the run leaves the statistics of an image it never trained on null. Such an image is
ranked as the noisiest: its cdf is that of the feature's noisy end (1 where high values mark a
likely wrong label, 0 where low ones do; ``IMAGE_FEATURES``), and the cdf knots are taken over
the images that have a value. A feature with no value at all is refused.

Records: a file or table written before pairs existed records none and means ``DEFAULT_PAIR``
(``FeaturePair.from_record``). Ground truth (``true_label``, ``noisy``) is never read here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from swift_sampler.storage import StoreError, StoreLayout, UsageError, read_features_meta, read_view

CROP_FEATURES = ("loss", "entropy_r", "grad_norm")
# Per-image feature -> its noisy end: +1 where a high value marks a likely wrong label, -1 where
# a low one does (a wrong label is hard to fit: high loss, low margin and probability of the
# given label, disagreement, learned late; cartography's variability has no a-priori sign, +1
# as in bench/bench_detection.py). ``epochs_seen`` is bookkeeping of the run, not a feature.
IMAGE_FEATURES = {
    "loss_mean": 1, "loss_ema": 1, "margin_mean": -1, "prob_mean": -1, "prob_std": 1,
    "disagree_epochs": 1, "learned_epoch": 1,
}
FEATURES = CROP_FEATURES + tuple(IMAGE_FEATURES)
# The same for the per-crop features (a wrong label: a high loss and grad norm, a low E^r: the
# model puts its mass on one other class).
CROP_NOISY_END = {"loss": 1, "entropy_r": -1, "grad_norm": 1}


def noisy_end(name: str) -> int:
    """+1 where a high value of feature ``name`` marks a likely wrong label, -1 where a low one does."""
    return IMAGE_FEATURES.get(name) or CROP_NOISY_END[name]
# What a frozen model's forward pass gives for a fresh crop (``online`` training).
ONLINE_FEATURES = ("loss", "entropy_r")
DEFAULT_FEATURES = ("loss", "entropy_r")
CDF_BY = ("global", "class")
_HOW_TO_GET_DYNAMICS = ("build the features with `swift-sampler pipeline build-features --checkpoint "
                        "CKPT`, CKPT a checkpoint of a run that recorded its training dynamics (any "
                        "`train` run does), or choose per-crop features (--features-pair "
                        f"{','.join(DEFAULT_FEATURES)})")


@dataclass(frozen=True)
class FeaturePair:
    """The sampler's two features, in order (``f1``, ``f2``), and how their cdf is taken.

    Attributes:
        features: two distinct names of ``FEATURES``.
        cdf_by: "global" (over all crops) or "class" (among the crops of each given label).
    """

    features: tuple[str, str] = DEFAULT_FEATURES
    cdf_by: str = "global"

    def __post_init__(self) -> None:
        if isinstance(self.features, str) or not isinstance(self.features, Iterable):
            raise UsageError(f"features: expected two feature names, got {self.features!r}")
        names = tuple(self.features)
        object.__setattr__(self, "features", names)
        if len(names) != 2:
            raise UsageError(f"features: a sampler combines two features, got {list(names)}")
        for name in names:
            if name not in FEATURES:
                raise UsageError(f"features: unknown feature {name!r}; choose two of {', '.join(FEATURES)}")
        if names[0] == names[1]:
            raise UsageError(f"features: {names[0]!r} twice; G = c1*f1 + c2*f2 needs two different features")
        if self.cdf_by not in CDF_BY:
            raise UsageError(f"cdf_by: unknown {self.cdf_by!r} (expected one of {', '.join(CDF_BY)})")

    @classmethod
    def parse(cls, text: str, cdf_by: str = "global") -> FeaturePair:
        """``"loss_mean,margin_mean"`` (the command line's ``--features-pair``)."""
        return cls(tuple(part.strip() for part in str(text).split(",")), cdf_by)

    @classmethod
    def from_record(cls, record: Mapping) -> FeaturePair:
        """The pair a file or table records (``record()``'s keys); none recorded: the default."""
        features = record.get("features", list(DEFAULT_FEATURES))
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise UsageError(f"features: expected a list of two names, got {features!r}")
        return cls(tuple(features), record.get("cdf_by", "global"))

    def record(self) -> dict:
        return {"features": list(self.features), "cdf_by": self.cdf_by}

    @property
    def image_features(self) -> tuple[str, ...]:
        return tuple(f for f in self.features if f in IMAGE_FEATURES)

    def __str__(self) -> str:
        return ",".join(self.features) + (" (cdf by class)" if self.cdf_by == "class" else "")


DEFAULT_PAIR = FeaturePair()


def null_cdf(name: str) -> float | None:
    """The cdf an image without a value of ``name`` takes: its noisy end (None: never null)."""
    end = IMAGE_FEATURES.get(name)
    return None if end is None else (1.0 if end > 0 else 0.0)


def check_online(pair: FeaturePair) -> None:
    """Refuse a pair that fresh crops scored by a frozen model cannot give."""
    other = [f for f in pair.features if f not in ONLINE_FEATURES]
    if other:
        raise UsageError(f"the sampler uses {', '.join(map(repr, other))}, which a fresh crop's "
                         f"forward pass does not give (online features: {', '.join(ONLINE_FEATURES)}); "
                         "train with --features store or image")


def read_pair_columns(store, pair: FeaturePair, columns: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Per stored crop, in the ``feature_parts`` view's order: ``columns`` of that view, the
    pair's two features, and ``label`` when the cdf is taken by class.

    Per-crop features keep their stored dtype (float32); a per-image feature is float64, its
    image's value on every crop, NaN where the image has none.

    Raises:
        StoreError: no features yet; a per-image feature the store lacks (named, with what to do).
    """
    layout = StoreLayout(store).require()
    if not layout.feature_parts():
        raise StoreError(f"no feature parts in {layout.features_dir}: run "
                         "`swift-sampler pipeline build-features` first")
    wanted = [*columns, *(f for f in pair.features if f in CROP_FEATURES)]
    if pair.cdf_by == "class":
        wanted.append("label")
    if pair.image_features:
        wanted.append("index")
    wanted = list(dict.fromkeys(wanted))
    table = read_view(layout.root, "feature_parts", wanted)
    out = {c: table.column(c).to_numpy() for c in wanted}
    if pair.image_features:
        index = out["index"]
        for name, values in image_values(layout, pair.image_features).items():
            # An image the dynamics do not cover (no row) has no value: NaN, as a null.
            out[name] = np.concatenate([values, [np.nan]])[np.minimum(index, values.size)]
    return out


def image_values(layout: StoreLayout, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Per-image features by image index: float64 ``(max index + 1,)``, NaN for null or absent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(names)
    if not layout.dynamics.is_file():
        raise StoreError(f"the sampler uses {names[0]!r}, a training-dynamics statistic, and "
                         f"{layout.root} has no training dynamics (dynamics.parquet): {_HOW_TO_GET_DYNAMICS}")
    schema = pq.read_schema(layout.dynamics)
    for name in names:
        if name not in schema.names:
            raise StoreError(f"the sampler uses {name!r} and the store's training dynamics have no "
                             f"such column (they hold {', '.join(schema.names)}): {_HOW_TO_GET_DYNAMICS}")
    _check_same_checkpoint(layout, schema)
    table = read_view(layout.root, "dynamics", ["index", *names])
    index = table.column("index").to_numpy()
    out = {}
    for name in names:
        values = np.full(int(index.max()) + 1 if index.size else 0, np.nan)
        values[index] = table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()
        if not np.isfinite(values).any():
            raise StoreError(f"{name!r} has no value for any image (the run never trained on "
                             "them); train the checkpoint's run for an epoch at least")
        out[name] = values
    return out


def _check_same_checkpoint(layout: StoreLayout, schema) -> None:
    # Features and dynamics are read side by side: both must describe the same model.
    if not layout.features_meta.is_file():
        raise StoreError(f"{layout.features_meta} missing: the features are incomplete; finish "
                         "`swift-sampler pipeline build-features` first")
    meta = json.loads((schema.metadata or {}).get(b"swift_sampler", b"{}"))
    mine = read_features_meta(layout).get("checkpoint_sha256")
    if meta.get("checkpoint_sha256") != mine:
        raise StoreError(f"{layout.dynamics.name} holds the dynamics of another checkpoint than the "
                         f"one the features were built from; {_HOW_TO_GET_DYNAMICS}")


__all__ = ["CDF_BY", "CROP_FEATURES", "DEFAULT_FEATURES", "DEFAULT_PAIR", "FEATURES",
           "IMAGE_FEATURES", "ONLINE_FEATURES", "FeaturePair", "check_online", "image_values",
           "null_cdf", "read_pair_columns"]
