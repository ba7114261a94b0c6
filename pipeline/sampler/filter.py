"""The 2x oversample-and-filter stage (arXiv 2410.05578, §4.2): keep half the candidates, by tau.

For a batch of B the loader draws 2B candidate crops, scores them, and keeps B *without
replacement* with probability proportional to tau, by Efraimidis-Spirakis keys: each candidate
gets ``key = log(u) / tau`` (``u`` uniform in (0, 1]) and the ``keep`` largest keys win. This is
sequential sampling without replacement: the first pick is ``i`` with probability
``tau_i / sum(tau)``, the next one likewise among the rest, and so on.

- ``tau = 0``: key ``-inf``, never kept.
- Fewer than ``keep`` candidates with ``tau > 0``: all of those are kept and the batch is short;
  nothing is drawn twice and no zero-tau crop is padded in. ``FilterStats`` counts such batches.
- Equal tau (the uniform sampler): every ``keep``-subset is equally likely.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


def es_keys(tau, rng: np.random.Generator) -> np.ndarray:
    """Efraimidis-Spirakis keys ``log(u)/tau`` (float64; ``-inf`` where tau == 0)."""
    tau = np.asarray(tau, dtype=np.float64)
    if tau.ndim != 1:
        raise ValueError(f"tau must be 1-D, got shape {tau.shape}")
    if tau.size and (not np.all(np.isfinite(tau)) or tau.min() < 0):
        raise ValueError("tau must be finite and >= 0")
    u = 1.0 - rng.random(tau.size)  # in (0, 1]: log(u) is finite
    with np.errstate(divide="ignore"):
        keys = np.log(u) / np.where(tau > 0, tau, 1.0)
    keys[tau <= 0] = -np.inf
    return keys


def select(tau, keep: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``keep`` candidates drawn without replacement with probability ~ tau.

    Args:
        tau: (n,) float, >= 0.
        keep: how many to keep (0 <= keep).
        rng: NumPy generator (the draw is a function of its state alone).

    Returns:
        int64 indices, ascending, ``min(keep, count(tau > 0))`` of them.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    keys = es_keys(tau, rng)
    positive = int(np.count_nonzero(keys > -np.inf))
    k = min(keep, positive)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    top = np.argpartition(-keys, k - 1)[:k] if k < keys.size else np.arange(keys.size)
    return np.sort(top).astype(np.int64)


def select_torch(tau, keep: int, generator=None):
    """torch twin of ``select`` (on the device of ``tau``): sorted int64 indices."""
    import torch

    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    tau = tau.to(torch.float64)
    u = 1.0 - torch.rand(tau.shape, generator=generator, dtype=torch.float64, device=tau.device)
    keys = torch.where(tau > 0, torch.log(u) / torch.where(tau > 0, tau, torch.ones_like(tau)),
                       torch.full_like(tau, float("-inf")))
    k = min(keep, int((tau > 0).sum()))
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=tau.device)
    return torch.sort(torch.topk(keys, k).indices).values


@dataclass
class FilterStats:
    """Counters of a filter stage; ``kept_fraction`` = kept / candidates."""

    candidates: int = 0
    kept: int = 0
    wanted: int = 0
    short_batches: int = 0

    def update(self, candidates: int, kept: int, wanted: int) -> None:
        self.candidates += candidates
        self.kept += kept
        self.wanted += wanted
        self.short_batches += int(kept < wanted)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.candidates if self.candidates else 0.0


def filter_candidates(src: Iterable[Any], *, keep_ratio: float = 0.5, seed: int = 0,
                      stats: FilterStats | None = None) -> Iterator[Any]:
    """Stage: for each group of candidates keep ``round(keep_ratio * len)`` by tau.

    A group is a list of dicts with a ``"tau"`` field (yields the kept dicts, in input order) or
    a dict of equal-length columns with a ``"tau"`` column (NumPy arrays, torch tensors or lists;
    yields the same dict with every column indexed). ``stats`` (optional) is updated per group.
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    rng = np.random.default_rng(seed)
    for group in src:
        if isinstance(group, dict):
            tau = _as_numpy(group["tau"])
            wanted = int(round(keep_ratio * len(tau)))
            idx = select(tau, wanted, rng)
            out = {k: _take(v, idx) for k, v in group.items()}
        else:
            tau = np.array([c["tau"] for c in group], dtype=np.float64)
            wanted = int(round(keep_ratio * len(tau)))
            idx = select(tau, wanted, rng)
            out = [group[i] for i in idx]
        if stats is not None:
            stats.update(len(tau), len(idx), wanted)
        yield out


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _take(column, idx: np.ndarray):
    if hasattr(column, "index_select"):
        import torch

        return column.index_select(0, torch.as_tensor(idx, device=column.device))
    if isinstance(column, np.ndarray):
        return column[idx]
    return [column[i] for i in idx]


__all__ = ["FilterStats", "es_keys", "filter_candidates", "select", "select_torch"]
