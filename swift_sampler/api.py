"""The stages as plain functions (what ``swift_sampler`` exports); each returns a summary dict.

Heavy modules (torch, the trainer) are imported inside the functions, so ``import
swift_sampler`` stays quick.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from swift_sampler.pipeline.sampler.function import Sampler

PathLike = str | os.PathLike


def ingest(source: str, store: PathLike, **options: Any) -> dict[str, Any]:
    """Build a store (WebDataset shards, manifest, samples table) from ``source``.

    ``source``: ``imagefolder:DIR``, ``digits`` or ``torchvision:cifar10``. Options as
    ``swift-sampler pipeline ingest``: ``val_frac``, ``test_frac``, ``noise``, ``labels``,
    ``seed``, ``limit``, ``progress`` ...
    """
    from swift_sampler.pipeline.ingest.build import ingest as _ingest

    return _ingest(source, store, **options)


def train_model(store: PathLike, name: str | None, *, sampler: Sampler | PathLike | None = None,
                preset: str | None = None, features: str | None = None,
                selection: str | None = None, allow_foreign: bool = False,
                **overrides: Any) -> dict[str, Any]:
    """Train a model on the store's train split; ``STORE/runs/NAME/`` holds the checkpoint.

    (Not called ``train``: ``swift_sampler.train`` is the training package.)

    Args:
        sampler: None (uniform sampling: this is how ``w_share`` is trained), a ``Sampler`` or
            a sampler file: the loader then draws 2x the crops and keeps half by tau.
        features, selection: how the sampler stage draws and keeps (``store`` or ``image``;
            ``systematic`` or ``es``), as ``swift-sampler train --features/--selection``; None:
            what a sampler file records its search used (``store``, ``systematic`` for a
            ``Sampler`` object or a file that records nothing).
        allow_foreign: accept a sampler file learned on another store or other features
            (refused by default, as ``train --sampler`` refuses it without
            ``--allow-foreign-tables``).
        preset: a training preset (``digits``, ``cpu-quick``, ``paper-cifar``); None picks one
            from the image size and the hardware.
        overrides: any ``TrainConfig`` field (``epochs``, ``lr``, ``seed``, ``workers`` ...).

    Returns:
        The run summary (``checkpoint``, ``accuracy``, ``val_accuracy``, ...).
    """
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import fit

    if preset is None:
        from swift_sampler.storage import StoreLayout, read_manifest
        from swift_sampler.train.distributed import pick_device
        from swift_sampler.train.presets import preset_for_store

        preset = preset_for_store(read_manifest(StoreLayout(store)), pick_device().type == "cuda")
    hook = None
    if sampler is not None:
        from swift_sampler.pipeline.sampler.file import sampler_stage
        from swift_sampler.train.sampling import create_sampler_hook

        provenance = None
        if not isinstance(sampler, Sampler):
            from swift_sampler.pipeline.sampler.file import check_provenance
            from swift_sampler.pipeline.sampler.file import load_sampler as _load

            sampler, provenance = _load(Path(sampler))
            check_provenance(provenance, store, allow_foreign=allow_foreign, recorded_only=True)
        features, selection = sampler_stage(provenance, features, selection)
        hook = create_sampler_hook(store, sampler, features=features, selection=selection,
                                   seed=int(overrides.get("seed", 0)))
    return fit(resolve_config(str(store), preset=preset, name=name, **overrides), sampler=hook).summary


def build_features(store: PathLike, checkpoint: PathLike | Any, *,
                   features_pair: str | tuple[str, str] = "loss,entropy_r", cdf_by: str = "global",
                   **options: Any) -> dict[str, Any]:
    """Score every train crop with ``checkpoint`` (``w_share``): loss, E^r, grad norm; bring in
    the training dynamics of the checkpoint's run (``dynamics`` view); then build the cdf/cgf
    tables for ``features_pair`` (``"f1,f2"`` or a tuple; per-crop or per-image features, see
    ``pipeline.sampler.pair``), each feature's cdf over all crops or, with ``cdf_by="class"``,
    within each given label. Options as ``swift-sampler pipeline build-features``
    (``crops_per_image``, ``grad_norm``, ``seed``, ``quantiles``, ``angles``, ``progress`` ...).

    ``checkpoint`` may also be a model trained elsewhere: any ``torch.nn.Module`` whose last
    ``nn.Linear`` is its head (``train.models.as_classifier`` says what it is fed). It has no
    training dynamics, so only per-crop features (``loss``, ``entropy_r``, ``grad_norm``) can
    form the pair; the search trains its trials by a model name, so learn the sampler from a
    checkpoint of ``train`` (``--model torchvision:<arch>``, ``--pretrained``)."""
    from torch import nn

    from swift_sampler.pipeline.features.build import build_features as _build
    from swift_sampler.pipeline.sampler.pair import FeaturePair
    from swift_sampler.storage import StoreLayout, read_manifest, sha256_file
    from swift_sampler.storage.errors import UsageError
    from swift_sampler.train.checkpoint import check_classes, load_model
    from swift_sampler.train.distributed import pick_device
    from swift_sampler.train.models import classifier_for_store

    pair = (FeaturePair.parse(features_pair, cdf_by) if isinstance(features_pair, str)
            else FeaturePair(tuple(features_pair), cdf_by))
    sizes = {k: options.pop(k, None) for k in ("quantiles", "angles")}
    with_tables = options.pop("tables", True)
    device = options.pop("device", None) or pick_device()
    manifest = read_manifest(StoreLayout(store))
    if isinstance(checkpoint, nn.Module):
        if pair.image_features and with_tables:
            raise UsageError(
                f"{', '.join(pair.image_features)}: training dynamics, which a model passed as a "
                "module does not have; choose per-crop features (features_pair='loss,entropy_r') "
                "or pass the checkpoint of a `train` run")
        model, checksum, checkpoint = classifier_for_store(checkpoint, manifest), None, None
    else:
        model, meta = load_model(checkpoint, device)
        check_classes(meta, manifest, str(checkpoint))
        checksum = sha256_file(checkpoint)
    summary = _build(store, model, checkpoint_sha256=checksum, device=device, tables=False, **options)
    return {**summary, **store_dynamics_and_tables(store, checkpoint, pair=pair, tables=with_tables, **sizes)}


def store_dynamics_and_tables(store: PathLike, checkpoint: PathLike | None, *, pair=None,
                              tables: bool = True, quantiles: int | None = None,
                              angles: int | None = None) -> dict[str, Any]:
    """After scoring: the checkpoint's training dynamics into the store, then the tables for
    ``pair`` (``pipeline.sampler.pair.FeaturePair``, default the paper's), in that order so that
    a per-image feature is read from the dynamics of the same checkpoint. Returns the summary's
    ``dynamics``/``dynamics_epochs`` (when the run recorded them) and ``tables``. Without a
    checkpoint (features of a model trained elsewhere) the store keeps no dynamics."""
    from swift_sampler.pipeline.sampler.pair import DEFAULT_PAIR
    from swift_sampler.pipeline.sampler.table_store import build_store_tables
    from swift_sampler.storage import StoreLayout, exclusive_lock
    from swift_sampler.train.dynamics import store_dynamics

    # The features' lock: another build-features must not swap features or tables meanwhile.
    layout = StoreLayout(store)
    with exclusive_lock(layout.lock("features"), "build-features"):
        if checkpoint is None:  # never pair these features with another checkpoint's dynamics
            layout.dynamics.unlink(missing_ok=True)
            out = {}
        else:
            out = dict(store_dynamics(store, checkpoint) or {})
        if tables:
            sizes = {k: v for k, v in (("quantiles", quantiles), ("angles", angles)) if v is not None}
            out["tables"] = build_store_tables(store, pair=pair or DEFAULT_PAIR, **sizes)
    return out


def learn_sampler(store: PathLike, checkpoint: PathLike, *, name: str = "ss", steps: int = 40,
                  confirm: bool = True, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Search the 10 parameters (GP-UCB; resumable) and write ``best_sampler.json``.

    Options as ``search.run.search``: ``agent``, ``transform``, ``seed``, ``finetune``
    (``InnerLoopSettings``), ``trial_seeds``, ``guard`` (``GuardSettings``), ``workers`` ...
    With ``confirm`` (as ``search run`` without ``--no-confirm``) the recommended sampler is
    trained from scratch with ``checkpoint``'s recipe and kept only if it beats it on val by more than one
    standard error (``search.confirm.keeps_sampler``); the
    summary's ``confirm`` holds the verdict and that run's checkpoint. ``best_sampler`` is the
    recommended sampler file and ``choice`` says how it was chosen (``guard``, ``uniform``,
    ``posterior-mean``).

    Each finished trial is logged at INFO (logger ``swift_sampler.search``: score, best, ETA);
    ``progress`` also shows a bar over the trials and the full-run check's training bars. An
    ``on_trial`` of your own replaces both.
    """
    from swift_sampler.search.progress import TrialProgress
    from swift_sampler.search.run import search

    if "on_trial" in options:
        return search(store, checkpoint, name=name, steps=steps, confirm=confirm,
                      progress=progress, **options)
    report = TrialProgress(name, bar=progress)
    options.setdefault("announce", report.announce)
    try:
        return search(store, checkpoint, name=name, steps=steps, confirm=confirm,
                      progress=progress, on_trial=report, **options)
    finally:
        report.close()


def load_sampler(path: Sampler | PathLike) -> Sampler:
    """A ``Sampler`` from a sampler file (validated field by field); a ``Sampler`` as is."""
    if isinstance(path, Sampler):
        return path
    from swift_sampler.pipeline.sampler.file import load_sampler as _load

    return _load(Path(path))[0]


def evaluate(store: PathLike, checkpoint: PathLike | Any, split: str = "test", *,
             progress: bool = True, **options: Any) -> dict[str, Any]:
    """Top-1 (and top-5) of a checkpoint or model on ``split``: a model of ``train`` or any
    ``torch.nn.Module`` whose last ``nn.Linear`` is its head (see ``build_features``).
    Options as ``swift-sampler evaluate`` (``batch_size``, ``workers``, ``device``,
    ``skip_damaged``); ``progress`` shows a bar over the split's samples."""
    from swift_sampler.train.evaluate import evaluate as _evaluate

    return _evaluate(store, checkpoint, split, progress=progress, **options)


def dropped(sampler: Sampler | PathLike, store: PathLike, *, below: float | None = None,
            allow_foreign: bool = False):
    """The train images a sampler drops or down-weights, least kept first: a list to inspect or
    relabel, ranked as cleanlab's ``find_label_issues`` ranks label issues.

    Args:
        sampler: a ``Sampler`` or a sampler file (``best_sampler.json``).
        store: the store whose features the sampler was learned on.
        below: list the images whose weight is below this. None (default): below the largest
            weight of any image, i.e. every image kept less often than the sampler's
            favourites; a tiny positive value lists only the images never kept.
        allow_foreign: accept a sampler file learned on another store or other features.

    Returns:
        A ``pyarrow.Table``, one row per listed image, sorted by ``weight`` ascending (ties by
        ``index``): ``index`` (int64, the store's train index), ``key`` (string, ``__key__`` in
        the shards), ``source`` (string, where ingest found the image: its path under the
        image folder, ``digits:I`` or ``cifar10:train:I``), ``label`` (int32, the label the
        store trains with), ``weight`` (float64, the mean tau of the image's scored crops, as
        ``sampler_weights`` gives it). The noise ground truth is never read.

    Raises:
        UsageError: ``below`` is not a positive number.
        StoreError: as ``sampler_weights``.
    """
    import math

    import numpy as np
    import pyarrow as pa

    from swift_sampler.pipeline.sampler.image_weights import sampler_weights
    from swift_sampler.storage import read_view
    from swift_sampler.storage.errors import UsageError

    if below is not None and not (isinstance(below, (int, float)) and math.isfinite(below)
                                  and below > 0):
        raise UsageError(f"below must be a positive number (a weight), got {below!r}; "
                         "leave it out to list every image kept less than the most kept")
    weights = sampler_weights(sampler, store, allow_foreign=allow_foreign).weights
    images = read_view(store, "samples", ["index", "key", "source", "label"],
                       where="split = 'train'", order_by='"index"')
    listed = np.flatnonzero(weights < (weights.max() if below is None else below))
    listed = listed[np.argsort(weights[listed], kind="stable")]  # index order breaks ties
    return images.take(listed).append_column("weight", pa.array(weights[listed]))


def sql(store: PathLike, query: str):
    """One read-only SQL query over the store's DuckDB views (``samples``, ``features``,
    ``cdf``, ``cgf``, ``trials``, ``metrics``); returns a ``pyarrow.Table``."""
    from swift_sampler.storage import query as _query

    return _query(store, query)


__all__ = ["Sampler", "build_features", "dropped", "evaluate", "ingest", "learn_sampler",
           "load_sampler", "sql", "train_model"]
