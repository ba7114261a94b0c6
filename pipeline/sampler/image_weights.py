"""A learned sampler in the user's own training loop: per-image weights and a WebDataset stage.

The store scores several crops of every training image; a user's own pipeline makes its own
crops, so here each image gets the mean tau of its scored crops (``image_tau``). Two ways to
use it without this project's trainer:

- map-style data: ``sampler_weights(...)`` gives one weight per image in the store's index
  order, with the image keys to line them up with the user's dataset, ready for
  ``torch.utils.data.WeightedRandomSampler``;
- a WebDataset pipeline: ``keep_by_tau(...)`` is a stage for ``.compose(...)`` that draws
  twice the samples it emits and keeps half, each with probability proportional to tau
  (capped at 1; systematic sampling over the shuffled window,
  ``pipeline.sampler.filter.select_systematic``), looked up by ``__key__``. By default a
  pass emits half the samples it reads; ``epoch_size="full"`` takes each sample as two
  candidates, as this project's trainer does, and emits as many as it reads.

    >>> import webdataset as wds                                   # doctest: +SKIP
    >>> stage = keep_by_tau("STORE/searches/ss/best_sampler.json", "STORE")  # doctest: +SKIP
    >>> ds = (wds.WebDataset(urls, shardshuffle=100).compose(stage)  # doctest: +SKIP
    ...       .decode("pill").to_tuple("jpg;png", "cls"))      # "pilrgb" for 3 channels

The features and keys are read through the store's DuckDB catalog (the views users query
with ``swift-sampler sql``); the noise ground truth is never read.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import RawValue
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np

from swift_sampler.storage import StoreError, read_view
from swift_sampler.storage.errors import UsageError

from .filter import SELECTIONS, select, select_systematic
from .function import Sampler
from .pair import read_pair_columns

log = logging.getLogger(__name__)

# Candidates per sample read: "half" emits half a pass, "full" a whole one.
EPOCH_SIZES = {"half": 1, "full": 2}


@dataclass(frozen=True)
class ImageWeights:
    """Per-image weights of a sampler, in the store's train index order.

    Attributes:
        keys: ``(N,)`` object array, the image key (``__key__`` in the shards) of each index.
        weights: ``(N,)`` float64, the mean tau of the image's scored crops, in [0, 1].
    """

    keys: np.ndarray
    weights: np.ndarray

    def by_key(self) -> dict[str, float]:
        return dict(zip(self.keys.tolist(), self.weights.tolist()))


def _sampler(sampler: Sampler | str | os.PathLike, store, allow_foreign: bool) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    from .file import check_provenance, load_sampler

    sampler, provenance = load_sampler(sampler)
    check_provenance(provenance, store, allow_foreign=allow_foreign, recorded_only=True)
    return sampler


def image_tau(sampler: Sampler | str | os.PathLike, store: str | os.PathLike, *,
              allow_foreign: bool = False) -> ImageWeights:
    """Mean tau over each train image's scored crops, from the store's ``feature_parts`` view
    (and its ``dynamics`` view for a per-image feature of the sampler's pair).

    Args:
        sampler: a ``Sampler`` or the path of a sampler file (``best_sampler.json``).
        store: the store whose features the sampler was learned on.
        allow_foreign: use a sampler file learned on another store or other features
            (refused by default, as ``train --sampler`` refuses it).

    Raises:
        StoreError: the store has no features, lacks a feature of the sampler (named), or a
            train image has none.
        SamplerFileError: an invalid sampler file, or one of another store or other features.
    """
    sampler = _sampler(sampler, store, allow_foreign)
    crops = read_pair_columns(store, sampler.pair, ("index",))
    keys = read_view(store, "samples", ["index", "key"], where="split = 'train'", order_by='"index"')
    n = keys.num_rows
    index = crops["index"]
    tau = sampler.tau_columns(crops, precise=True)
    counts = np.bincount(index, minlength=n)
    if counts.size != n or not counts.all():
        raise StoreError(f"{store}: {int((counts[:n] == 0).sum())} train image(s) have no scored "
                         "crops; run `swift-sampler pipeline build-features` to finish the features")
    weights = np.bincount(index, weights=tau, minlength=n) / counts
    return ImageWeights(keys=keys.column("key").to_numpy(zero_copy_only=False), weights=weights)


def sampler_weights(sampler: Sampler | str | os.PathLike, store: str | os.PathLike, *,
                    allow_foreign: bool = False) -> ImageWeights:
    """Weights for ``torch.utils.data.WeightedRandomSampler``, one per train image.

    ``weights[i]`` belongs to the image of index ``i`` (key ``keys[i]``); reorder by key to
    match a dataset in another order. An image whose weight is 0 is never drawn.

    Raises:
        StoreError: as ``image_tau``; every weight is 0 (nothing would be trained on).
        SamplerFileError: as ``image_tau`` (``allow_foreign`` as there).
    """
    w = image_tau(sampler, store, allow_foreign=allow_foreign)
    if not (w.weights > 0).any():
        raise StoreError("the sampler gives weight 0 to every image: nothing would be trained on")
    return w


class keep_by_tau:  # noqa: N801 - a stage, named like webdataset's stage functions
    """WebDataset stage: of every ``2 * batch`` candidates, keep ``batch`` with probability ~ tau.

    Args:
        sampler: a ``Sampler`` or a sampler file.
        store: the store the sampler was learned on (its features give each image's tau).
        batch: samples kept per window (the window holds twice as many candidates).
        seed: seed of the draws. Each pass over the data (each call of the stage) draws anew:
            without ``set_epoch``, from ``seed``, the pass's number in this copy of the stage
            and, in a DataLoader worker, the worker's torch seed (new every epoch, drawn from
            the main process's generator: a run repeats under ``torch.manual_seed``); after
            ``set_epoch(n)``, from ``seed``, ``n``, the worker id and the pass within the epoch
            alone.
        unknown: what to do with a sample whose ``__key__`` is not in the store: "error"
            (default) or "keep" (tau 1, counted and logged once per window).
        selection: "systematic" (default: sample ``i`` of a window is kept with probability
            exactly ``min(1, c * tau_i)``, ``c`` such that ``batch`` are kept; the window is
            shuffled first, so stream order makes no pattern) or "es" (Efraimidis-Spirakis keys,
            whose inclusion probabilities are only roughly proportional to tau).
        epoch_size: "half" (default: every sample read is one candidate, so a pass over the
            data emits half its samples, each at most once: an epoch of half the steps) or
            "full" (every sample is two candidates side by side, as this project's trainer
            draws two per image: a pass emits exactly as many samples as it reads, one that
            tau favours may come twice (as a separate dict; augment after the stage), one of
            tau 0 never, and under equal tau each exactly once).
        allow_foreign: accept a sampler file learned on another store or other features.

    The stage reads ``__key__`` only, so it can sit before decoding: samples it drops are
    never decoded. A window at the end of the stream keeps half of its candidates.
    """

    def __init__(self, sampler: Sampler | str | os.PathLike, store: str | os.PathLike, *,
                 batch: int = 256, seed: int = 0, unknown: str = "error",
                 selection: str = "systematic", epoch_size: str = "half",
                 allow_foreign: bool = False) -> None:
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            # 2.5 would keep 40% of each window, not half
            raise UsageError(f"batch must be an integer >= 1, got {batch!r}")
        if unknown not in ("error", "keep"):
            raise UsageError(f"unknown must be 'error' or 'keep', got {unknown!r}")
        if selection not in SELECTIONS:
            raise UsageError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if epoch_size not in EPOCH_SIZES:
            raise UsageError(f"epoch_size must be 'half' or 'full', got {epoch_size!r}")
        self.selection, self.epoch_size = selection, epoch_size
        self.tau = sampler_weights(sampler, store, allow_foreign=allow_foreign).by_key()
        self.batch, self.seed, self.unknown = batch, seed, unknown
        self.unknown_count = 0
        # The epoch lives in shared memory so that persistent DataLoader workers see set_epoch
        # (timm's reader_wds does the same); -1: never set.
        self._epoch = RawValue("q", -1)
        self._counted_epoch, self.passes = -1, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch`` (call before each epoch, as with ``DistributedSampler``).

        From the first call on, a pass's draw depends on ``seed``, ``epoch``, the worker id and
        the pass's number within the epoch only, not on torch's generator; workers see the
        epoch whether or not they are persistent. Not calling it again repeats the epoch.
        """
        if int(epoch) < 0:
            raise UsageError(f"epoch must be >= 0, got {epoch}")
        self._epoch.value = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:
            # A plain pickle or deep copy, not a worker being started: shared memory cannot
            # travel, the epoch does.
            state["_epoch"] = self._epoch.value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_epoch"], int):
            state["_epoch"] = RawValue("q", state["_epoch"])
        self.__dict__.update(state)

    def _tau_of(self, sample: dict[str, Any]) -> float:
        key = sample.get("__key__")
        if key in self.tau:
            return self.tau[key]
        if self.unknown == "error":
            raise StoreError(f"sample key {key!r} is not a train image of the store; pass "
                             "unknown='keep' to let unknown samples through with tau 1")
        self.unknown_count += 1
        return 1.0

    def _pass_rng(self) -> np.random.Generator:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        epoch = self._epoch.value
        if epoch != self._counted_epoch:
            self._counted_epoch, self.passes = epoch, 0
        if epoch < 0:
            # A worker that is not persistent starts each epoch from the main process's copy,
            # pass count 0 (issue #28: every epoch kept the same keys); torch's worker seed
            # changes every epoch. Where the copy lives on, the pass count tells epochs apart.
            stream = info.seed if info else 0
        else:
            stream = info.id if info else 0
        rng = np.random.default_rng([int(self.seed), epoch + 1, stream, self.passes])
        self.passes += 1
        return rng

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = self._pass_rng()
        per_sample = EPOCH_SIZES[self.epoch_size]
        window: list[dict[str, Any]] = []
        for sample in src:
            window.append(sample)
            if len(window) * per_sample == 2 * self.batch:
                yield from self._keep(window, self.batch, rng)
                window = []
        if window:
            yield from self._keep(window, len(window) * per_sample // 2 or 1, rng)

    def _keep(self, window, keep: int, rng) -> Iterator[dict[str, Any]]:
        before = self.unknown_count
        tau = np.array([self._tau_of(s) for s in window], dtype=np.float64)
        if self.unknown_count > before:
            log.warning("%d sample(s) not in the store kept with tau 1 (%d so far)",
                        self.unknown_count - before, self.unknown_count)
        per_sample = EPOCH_SIZES[self.epoch_size]
        if self.selection == "systematic":
            # A sample's candidates stay side by side, so systematic sampling draws them
            # together: under equal tau each sample is kept exactly once.
            order = np.repeat(rng.permutation(len(window)), per_sample)
            chosen = order[select_systematic(tau[order], keep, rng)]
        else:
            order = np.repeat(np.arange(len(window)), per_sample)
            chosen = order[select(tau[order], keep, rng)]
        previous = -1
        for i in np.sort(chosen):
            yield window[i] if i != previous else dict(window[i])
            previous = i


__all__ = ["ImageWeights", "image_tau", "keep_by_tau", "sampler_weights"]
