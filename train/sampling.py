"""Training with a sampler: the 2x oversample-and-filter stage wired into the loader
(arXiv 2410.05578, §4.2: "we randomly sample twice the number of needed crops, calculate their features
on the according pre-trained model, and use the given sampler and the features to sample half").

Two feature sources:
- ``store`` (default): ``StoredCrops`` picks two of the K crops stored for each image in the
  feature store, replays them exactly (``cut_crops`` == ``apply_crop``) and attaches their tau,
  computed once for all N x K rows; ``TauFilter`` keeps B of the 2B by Efraimidis-Spirakis keys
  (``pipeline.sampler.filter.select``). No extra forward pass; both run inside the loader workers.
- ``online``: the loader yields 2B fresh random crops (``keep_all``); ``OnlineFilter`` scores
  them with the frozen pretrained model in the training process (on the GPU when present) and
  keeps B by ``pipeline.sampler.filter.select_torch``.

Nothing here reads ground-truth noise fields: features carry ``index, crop, top, left, height,
width, flip, loss, entropy_r`` only.
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
from swift_sampler.pipeline.sampler.filter import select, select_torch
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.storage import StoreError, StoreLayout, read_view
from swift_sampler.storage.errors import UsageError

from .loader import collate, decode
from .trainer import SamplerHook

FEATURE_COLUMNS = ("index", "crop", "top", "left", "height", "width", "flip", "loss", "entropy_r")
log = logging.getLogger(__name__)


class StoredCrops:
    """Crop stage over the feature store: per image, ``candidates`` distinct stored crops
    (uniformly among its K), each with ``tau`` and ``crop_id``.

    Built in the main process (tau for every stored crop computed once, vectorised); the
    arrays are inherited by the loader workers.
    """

    def __init__(self, store: str | os.PathLike, sampler: Sampler) -> None:
        layout = StoreLayout(store)
        parts = layout.feature_parts()
        if not parts or not layout.features_meta.is_file():
            raise StoreError(f"store {layout.root} has no feature store; run `swift-sampler "
                             "pipeline build-features` first, or use --features online")
        table = read_view(layout.root, "feature_parts", FEATURE_COLUMNS)
        cols = {c: table.column(c).to_numpy() for c in FEATURE_COLUMNS}
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
        tau = sampler.tau(cols["loss"][order].astype(np.float32),
                          cols["entropy_r"][order].astype(np.float32))
        self.tau = np.asarray(tau, dtype=np.float32).reshape(n, k)

    def choose_first(self, src, *, crop_rng: np.random.Generator, filter_rng: np.random.Generator,
                     size: int, candidates: int, channels: int, out_size, skipped: list[str]):
        """Stage: undecoded samples -> batches of ``size`` kept crops, chosen before decoding.

        The same draws as ``__call__`` + ``batch_samples`` + ``tau_filter``, in the same order:
        per image, ``candidates`` stored crops by ``crop_rng``; per ``2B`` candidates, ``B``
        kept by Efraimidis-Spirakis keys from ``filter_rng`` on their stored tau. So for a
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
                for k in select(tau, size, filter_rng):
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


def tau_filter(batch: dict[str, Any], *, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Batch filter: keep ``size`` crop-samples without replacement, probability ~ ``tau``
    (fewer when fewer than ``size`` have tau > 0: the batch is then short)."""
    keep = torch.from_numpy(select(batch["tau"].numpy(), size, rng))
    n = len(batch["index"])
    out = {k: (v.index_select(0, keep) if isinstance(v, torch.Tensor) and len(v) == n else v)
           for k, v in batch.items()}
    out["candidates"] = n
    return out


# The loader may let a StoredCrops stage choose before decoding when its batches are filtered
# by tau_filter: choose_first reproduces exactly that rule.
StoredCrops.chooses_first_with = staticmethod(tau_filter)


def keep_all(batch: dict[str, Any], *, rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Batch filter that keeps every candidate (online mode filters in the training step)."""
    return batch


class OnlineFilter:
    """Step filter: score ``2B`` fresh crops with a frozen ``scorer`` and keep ``B`` by tau."""

    def __init__(self, scorer: nn.Module, sampler: Sampler, *, keep: int, device: torch.device,
                 seed: int = 0) -> None:
        self.scorer = scorer.to(device).eval()
        for p in self.scorer.parameters():
            p.requires_grad_(False)
        self.sampler, self.keep, self.device = sampler, keep, device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.scorer(x.contiguous(memory_format=torch.channels_last))
        tau = self.sampler.tau_torch(cross_entropy(logits, y), entropy_r(logits, y),
                                     dtype=torch.float32)
        keep = select_torch(tau, self.keep, generator=self.generator).cpu()
        n = len(batch["index"])
        out = {k: (v.index_select(0, keep) if isinstance(v, torch.Tensor) and len(v) == n else v)
               for k, v in batch.items()}
        out["candidates"] = n
        return out


def create_sampler_hook(store: str | os.PathLike, sampler: Sampler, *, features: str = "store",
                        scorer: nn.Module | None = None, batch_size: int | None = None,
                        device: torch.device | None = None, seed: int = 0,
                        describe: dict[str, Any] | None = None) -> SamplerHook:
    """The ``SamplerHook`` for ``train(config, sampler=...)``.

    Args:
        features: ``store`` (stored crops and features) or ``online`` (needs ``scorer``,
            ``batch_size`` and ``device``).
    """
    if features == "store":
        return SamplerHook(candidates_per_image=2, crop_stage=StoredCrops(store, sampler),
                           batch_filter=tau_filter, describe=describe)
    if features == "online":
        if scorer is None or batch_size is None or device is None:
            raise UsageError("--features online needs the pretrained model that scores crops "
                             "(--init CKPT or --scorer CKPT)")
        return SamplerHook(candidates_per_image=2, batch_filter=keep_all,
                           step_filter=OnlineFilter(scorer, sampler, keep=batch_size,
                                                    device=device, seed=seed),
                           describe=describe)
    raise UsageError(f"unknown feature source {features!r}; choose store or online")
