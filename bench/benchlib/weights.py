"""Per-image weights as loader stages, for the peers of the benchmark.

Two ways a peer restricts what the model trains on, both keeping the optimiser steps of a
uniform run (``len(loader) = N // B`` batches per epoch, whatever is kept):

- ``ImageWeights`` (``train.sampling.ImageTauCrops``): the 2x oversample-and-filter of the sampler stage (arXiv 2410.05578, §4.2) with a
  weight per *image* instead of a tau per crop: two random crops per image are drawn, each
  carries its image's weight as ``tau``, and the sampler stage's own filter
  (``train.sampling.TAU_FILTERS``, systematic by default) keeps B of the 2B without
  replacement with probability proportional to it. A weight of 0 is never
  kept. The oracle mask, the small-loss filter and cleanlab's pruning train this way, through
  the same mechanism as a learned sampler, so every method gets the same steps.
- ``SubsetCrops``: a crop stage that passes only the images of a subset (one random crop each):
  training "on k-1 folds" for cleanlab's cross-validation, where the subset is the data set
  and not a sampler.

Both are picklable objects (they run inside the loader workers) and look samples up by their
``index`` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from swift_sampler.train.loader import random_crops
from swift_sampler.train.sampling import TAU_FILTERS, ImageTauCrops
from swift_sampler.train.trainer import SamplerHook

# The library's stage for ``--features image``: the peers train through the very same code.
ImageWeights = ImageTauCrops


def weights_hook(weights: np.ndarray, *, describe: dict[str, Any] | None = None,
                 selection: str = "systematic") -> SamplerHook:
    """A ``SamplerHook`` that trains with per-image ``weights`` (2 candidates per image, B kept
    by the sampler stage's filter for ``selection``; a batch with fewer than B positive
    candidates comes out short)."""
    stage = ImageWeights(weights)
    w = stage.weights
    info = {"kind": "per-image weights", "images": int(w.size), "positive": int((w > 0).sum()),
            "selection": selection, **(describe or {})}
    return SamplerHook(candidates_per_image=2, crop_stage=stage, batch_filter=TAU_FILTERS[selection],
                       describe=info)


class SubsetCrops:
    """Crop stage: only images whose ``keep[index]`` is true, with ``random_crops``' crops.

    The loader's quota of ``N // B`` batches per epoch stays; the workers simply pass over
    their shards more often. Callers that want "E epochs over the subset" scale the epochs.
    """

    def __init__(self, keep: np.ndarray) -> None:
        keep = np.asarray(keep, dtype=bool)
        if keep.ndim != 1 or not keep.any():
            raise ValueError("the subset must be a 1-D boolean mask with at least one image")
        self.keep = keep

    def __call__(self, src: Iterable[dict[str, Any]], **kwargs: Any) -> Iterator[dict[str, Any]]:
        return random_crops((s for s in src if self.keep[s["index"]]), **kwargs)


def subset_hook(keep: np.ndarray, *, describe: dict[str, Any] | None = None) -> SamplerHook:
    """A ``SamplerHook`` that trains on the images of the boolean mask ``keep`` only."""
    stage = SubsetCrops(keep)
    info = {"kind": "subset", "images": int(stage.keep.size), "kept": int(stage.keep.sum()),
            **(describe or {})}
    return SamplerHook(candidates_per_image=1, crop_stage=stage, describe=info)
