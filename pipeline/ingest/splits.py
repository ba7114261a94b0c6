"""Seeded, stratified subsets and train/val/test splits over integer labels."""

from __future__ import annotations

import numpy as np

from swift_sampler.storage.errors import SwiftSamplerError


class SplitError(SwiftSamplerError, ValueError):
    """Split fractions or sizes that would leave a split (or a class in train) empty."""


def stratified_subset(labels: np.ndarray, limit: int, *, seed: int | np.random.Generator = 0
                      ) -> np.ndarray:
    """Positions of a seeded subset of ``limit`` items with the class proportions of ``labels``.

    Returns a sorted int64 array; all positions when ``limit >= len(labels)``. Per-class
    counts are floor or ceil of ``limit * n_c / n`` (largest remainder), so they sum to limit.
    """
    labels = np.asarray(labels)
    if limit < 1:
        raise SplitError(f"--limit must be a positive number of images, got {limit}")
    if limit >= labels.size:
        return np.arange(labels.size, dtype=np.int64)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = limit * sizes / labels.size
    take = np.floor(quotas).astype(np.int64)
    order = np.lexsort((classes, -(quotas - take)))
    take[order[: limit - int(take.sum())]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(labels: np.ndarray, *, val_frac: float, test_frac: float,
                     seed: int | np.random.Generator = 0, classes: list[str] | None = None
                     ) -> dict[str, np.ndarray]:
    """Split positions of ``labels`` into train/val/test, class by class.

    In each class of size n_c, ``round(val_frac * n_c)`` items go to val and
    ``round(test_frac * n_c)`` to test (half up), the rest to train.

    Returns:
        {"train", "val", "test"} -> sorted int64 positions; a split whose fraction is 0 is an
        empty array. Every position lands in exactly one split.

    Raises:
        SplitError: a fraction outside [0, 1), fractions summing to >= 1, a class left with
            nothing for train, or a split with a positive fraction left empty.
    """
    labels = np.asarray(labels)
    names = classes or []
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise SplitError(f"{name}={frac} must lie in [0, 1)")
    if val_frac + test_frac >= 1.0:
        raise SplitError(f"val_frac + test_frac = {val_frac + test_frac:g} leaves nothing to "
                         "train on; keep their sum below 1 (e.g. 0.1 and 0.1)")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(np.floor(val_frac * members.size + 0.5))
        n_test = int(np.floor(test_frac * members.size + 0.5))
        if members.size - n_val - n_test < 1:
            name = names[c] if c < len(names) else str(c)
            raise SplitError(f"class {name!r} has only {members.size} image(s): too few for "
                             f"val_frac={val_frac:g} and test_frac={test_frac:g} to leave any "
                             "for train; add images or lower the fractions")
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val:n_val + n_test])
        parts["train"].append(members[n_val + n_test:])
    out = {k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64)
           for k, v in parts.items()}
    for split, frac in (("train", 1.0), ("val", val_frac), ("test", test_frac)):
        if frac > 0 and out[split].size == 0:
            raise SplitError(f"{split}_frac={frac:g} leaves the {split} split empty with "
                             f"{labels.size} images; raise the fraction or add images")
    return out
