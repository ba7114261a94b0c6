"""Training with a sampler: the 2x oversample-and-filter stage wired into the loader
(arXiv 2410.05578, §4.2: "we randomly sample twice the number of needed crops, calculate their features
on the according pre-trained model, and use the given sampler and the features to sample half").

Three feature sources:
- ``store`` (default): ``StoredCrops`` picks two of the K crops stored for each image in the
  feature store, replays them exactly (``cut_crops`` == ``apply_crop``) and attaches their tau,
  computed once for all N x K rows; ``tau_filter`` keeps B of the 2B. No extra forward pass;
  both run inside the loader workers.
- ``online``: the loader yields 2B fresh random crops (``keep_all``); ``OnlineFilter`` scores
  them with the frozen pretrained model in the training process (on the GPU when present) and
  keeps B.
- ``image``: fresh random crops, as uniform training cuts them, each carrying its *image's* tau:
  the mean tau of the image's stored crops (``ImageTauCrops``). No extra forward pass and the
  augmentation of uniform training; the choice is per image, not per crop.

The keep rule (``selection``) is ``systematic`` by default: each crop kept with probability
proportional to its tau (capped at 1), the two crops of an image drawn together, so that equal
tau means every image once per epoch (``pipeline.sampler.filter.select_systematic``). ``es``
(Efraimidis-Spirakis keys, each crop drawn on its own) is the rule of earlier results.

The sampler reads its feature pair (``pipeline.sampler.pair``): in ``store`` and ``image`` mode
any pair the store holds; ``online`` scores fresh crops, so only per-crop features it computes
(loss, E^r) and a pair with another is refused.

Nothing here reads ground-truth noise fields: features carry ``index, crop, top, left, height,
width, flip``, the training ``label`` and the sampler's two features only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from swift_sampler.pipeline.features.crops import Crop
from swift_sampler.pipeline.features.scoring import cross_entropy, entropy_r
from swift_sampler.pipeline.ingest.decode import CorruptSampleError
from swift_sampler.pipeline.sampler.filter import (
    select,
    select_systematic,
    select_torch,
    selection_rule,
)
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.pair import check_online, read_pair_columns
from swift_sampler.storage import StoreError, StoreLayout
from swift_sampler.storage.errors import UsageError

from .loader import collate, decode, random_crops
from .trainer import SamplerHook

CROP_COLUMNS = ("index", "crop", "top", "left", "height", "width", "flip")
log = logging.getLogger(__name__)


class StoredCrops:
    """Crop stage over the feature store: per image, ``candidates`` distinct stored crops
    (uniformly among its K), each with ``tau`` and ``crop_id``.

    Built in the main process (tau for every stored crop computed once, vectorised); the
    arrays are inherited by the loader workers.
    """

    def __init__(self, store: str | os.PathLike, sampler: Sampler, *,
                 selection: str = "systematic") -> None:
        self.select = selection_rule(selection)
        # The loader lets this stage choose before decoding when its batches are filtered by
        # the same rule: choose_first reproduces exactly that filter.
        self.chooses_first_with = TAU_FILTERS[selection]
        layout = StoreLayout(store)
        parts = layout.feature_parts()
        if not parts or not layout.features_meta.is_file():
            raise StoreError(f"store {layout.root} has no feature store; run `swift-sampler "
                             "pipeline build-features` first, or use --features online")
        cols = read_pair_columns(layout.root, sampler.pair, CROP_COLUMNS)
        order = np.lexsort((cols["crop"], cols["index"]))
        index = cols["index"][order]
        n = int(index.max()) + 1
        counts = np.bincount(index, minlength=n)
        k = int(counts.max())
        if counts.min() != k:
            raise StoreError(f"feature store of {layout.root} is incomplete: some images have "
                             f"fewer than {k} crops; finish build-features first")
        self.k = k
        self.crops = np.stack([cols[c][order] for c in ("top", "left", "height", "width", "flip")],
                              axis=1).astype(np.int64).reshape(n, k, 5)
        # Stored per-crop features are float32 (the fast path); per-image ones stay float64.
        tau = sampler.tau_columns({name: cols[name][order] for name in (*sampler.pair.features, "label")
                                   if name in cols})
        self.tau = np.asarray(tau, dtype=np.float32).reshape(n, k)

    def choose_first(self, src, *, crop_rng: np.random.Generator, filter_rng: np.random.Generator,
                     size: int, candidates: int, channels: int, out_size, skipped: list[str]):
        """Stage: undecoded samples -> batches of ``size`` kept crops, chosen before decoding.

        The same draws as ``__call__`` + ``batch_samples`` + ``chooses_first_with``, in the same
        order: per image, ``candidates`` stored crops by ``crop_rng``; per ``2B`` candidates,
        ``B`` kept by this stage's selection rule from ``filter_rng`` on their stored tau. So for a
        seed the batches are bit-identical to choosing after cutting, as long as every image
        decodes (an image that does not is found only once chosen: its kept crops are dropped
        and the batch is short, where the other order would have skipped it before the draw).
        Only the images of kept crops are decoded, and only kept crops are cut.
        """
        window = size * candidates
        pending: list[tuple[dict[str, Any], int]] = []  # (sample, stored crop id)
        for s in src:
            i = s["index"]
            if i >= len(self.crops):
                raise StoreError(f"sample {s['key']} has no stored features (index {i}); the "
                                 "feature store belongs to another ingest")
            for j in crop_rng.choice(self.k, size=min(candidates, self.k), replace=False):
                pending.append((s, int(j)))
            while len(pending) >= window:
                cands, pending = pending[:window], pending[window:]
                tau = np.array([self.tau[c["index"], j] for c, j in cands], dtype=np.float32)
                images: dict[int, Any] = {}
                kept = []
                for k in self.select(tau, size, filter_rng):
                    c, j = cands[k]
                    if id(c) not in images:
                        try:
                            images[id(c)] = decode(c["data"], channels)
                        except CorruptSampleError as e:
                            log.warning("skipping corrupt sample %s: %s", c["key"], e)
                            skipped.append(c["key"])
                            images[id(c)] = None
                    if images[id(c)] is None:
                        continue
                    top, left, h, w, flip = (int(v) for v in self.crops[c["index"], j])
                    kept.append({"index": c["index"], "label": c["label"],
                                 "crop": Crop(top, left, h, w, bool(flip)), "crop_id": j,
                                 "tau": float(tau[k]), "source": images[id(c)]})
                if not kept:
                    continue
                batch = collate(kept, out_size)
                batch["candidates"] = len(cands)
                batch["skipped"] = list(skipped)
                skipped.clear()
                yield batch

    def __call__(self, src, *, rng: np.random.Generator, candidates: int = 2, augment: bool = True,
                 **_: Any):
        for s in src:
            i = s["index"]
            if i >= len(self.crops):
                raise StoreError(f"sample {s['key']} has no stored features (index {i}); the "
                                 "feature store belongs to another ingest")
            pick = rng.choice(self.k, size=min(candidates, self.k), replace=False)
            for j in pick:
                top, left, h, w, flip = (int(v) for v in self.crops[i, j])
                yield {"index": i, "label": s["label"], "crop": Crop(top, left, h, w, bool(flip)),
                       "crop_id": int(j), "tau": float(self.tau[i, j]), "source": s["image"]}


class ImageTauCrops:
    """Crop stage: ``random_crops`` with ``tau = weights[index]`` on every crop-sample, so the
    batch filter keeps an image's fresh crops with probability ~ its weight.

    Args:
        weights: float ``(N,)``, >= 0, not all 0, indexed by the train split's dense ``index``
            (``pipeline.sampler.image_weights.image_tau(...).weights`` for a sampler).
    """

    def __init__(self, weights) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not w.size:
            raise ValueError(f"weights must be a non-empty 1-D array (one value per train image), "
                             f"got shape {w.shape}")
        if not np.all(np.isfinite(w)) or w.min() < 0:
            raise ValueError("weights must be finite and >= 0")
        if not (w > 0).any():
            raise ValueError("weights are zero for every image: nothing would be trained on")
        self.weights = w

    def __call__(self, src, **kwargs: Any):
        for crop in random_crops(src, **kwargs):
            i = crop["index"]
            if i >= len(self.weights):
                raise StoreError(f"sample index {i} has no weight ({len(self.weights)} train "
                                 "images scored); the features belong to another ingest")
            crop["tau"] = float(self.weights[i])
            yield crop


def tau_filter(batch: dict[str, Any], *, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Batch filter: keep ``size`` crop-samples without replacement, each with probability
    ``min(1, c * tau)`` by systematic sampling (fewer when fewer than ``size`` have tau > 0:
    the batch is then short)."""
    return _keep_rows(batch, select_systematic(batch["tau"].numpy(), size, rng))


def tau_filter_es(batch: dict[str, Any], *, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """``tau_filter`` by Efraimidis-Spirakis keys (the ``es`` selection)."""
    return _keep_rows(batch, select(batch["tau"].numpy(), size, rng))


TAU_FILTERS = {"systematic": tau_filter, "es": tau_filter_es}


def _keep_rows(batch: dict[str, Any], keep) -> dict[str, Any]:
    keep = torch.as_tensor(keep)
    n = len(batch["index"])
    out = {k: (v.index_select(0, keep.to(v.device)) if isinstance(v, torch.Tensor) and len(v) == n
               else v) for k, v in batch.items()}
    out["candidates"] = n
    return out


def keep_all(batch: dict[str, Any], *, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Batch filter that keeps every candidate (online mode filters in the training step)."""
    return batch


class OnlineFilter:
    """Step filter: score ``2B`` fresh crops with a frozen ``scorer`` and keep ``B`` by tau."""

    def __init__(self, scorer: nn.Module, sampler: Sampler, *, keep: int, device: torch.device,
                 seed: int = 0, selection: str = "systematic") -> None:
        selection_rule(selection)  # refuse an unknown name here, not at the first step
        check_online(sampler.pair)
        self.scorer = scorer.to(device).eval()
        for p in self.scorer.parameters():
            p.requires_grad_(False)
        self.sampler, self.keep, self.device, self.selection = sampler, keep, device, selection
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.scorer(x.contiguous(memory_format=torch.channels_last))
        scores = {"loss": cross_entropy(logits, y), "entropy_r": entropy_r(logits, y)}
        n1, n2 = self.sampler.pair.features
        tau = self.sampler.tau_torch(scores[n1], scores[n2], dtype=torch.float32,
                                     labels=y if self.sampler.pair.cdf_by == "class" else None)
        if self.selection == "es":
            keep = select_torch(tau, self.keep, generator=self.generator).cpu()
        else:  # 2B numbers: the CPU draw costs nothing against the forward pass
            keep = select_systematic(tau.cpu().numpy(), self.keep, self.rng)
        return _keep_rows(batch, keep)


def create_sampler_hook(store: str | os.PathLike, sampler: Sampler, *, features: str = "store",
                        scorer: nn.Module | None = None, batch_size: int | None = None,
                        device: torch.device | None = None, seed: int = 0,
                        describe: dict[str, Any] | None = None,
                        selection: str = "systematic") -> SamplerHook:
    """The ``SamplerHook`` for ``train(config, sampler=...)``.

    Args:
        features: ``store`` (stored crops and features), ``image`` (fresh crops, each image's
            mean stored tau) or ``online`` (needs ``scorer``, ``batch_size`` and ``device``).
        selection: the keep rule, ``systematic`` (default) or ``es``; recorded in ``describe``.
    """
    if selection not in TAU_FILTERS:
        raise UsageError(f"unknown selection {selection!r}; choose one of {', '.join(TAU_FILTERS)}")
    describe = {**(describe or {}), "selection": selection}
    if features == "store":
        return SamplerHook(candidates_per_image=2,
                           crop_stage=StoredCrops(store, sampler, selection=selection),
                           batch_filter=TAU_FILTERS[selection], describe=describe)
    if features == "image":
        from swift_sampler.pipeline.sampler.image_weights import image_tau

        try:
            stage = ImageTauCrops(image_tau(sampler, store).weights)
        except ValueError as e:
            raise UsageError(f"the sampler cannot train on {store}: {e}") from None
        return SamplerHook(candidates_per_image=2, crop_stage=stage,
                           batch_filter=TAU_FILTERS[selection], describe=describe)
    if features == "online":
        check_online(sampler.pair)
        if scorer is None or batch_size is None or device is None:
            raise UsageError("--features online needs the pretrained model that scores crops "
                             "(--init CKPT or --scorer CKPT)")
        return SamplerHook(candidates_per_image=2, batch_filter=keep_all,
                           step_filter=OnlineFilter(scorer, sampler, keep=batch_size,
                                                    device=device, seed=seed,
                                                    selection=selection),
                           describe=describe)
    raise UsageError(f"unknown feature source {features!r}; choose store, image or online")
