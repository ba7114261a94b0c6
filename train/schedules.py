"""Learning-rate schedules as small pure functions of training progress (as in nanoGPT's
``get_lr``): no state, so resuming needs nothing but the step counter.

Progress ``t`` is measured in epochs as a float (``epoch + step / steps_per_epoch``), so the
same schedule applies to any batch size or dataset size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from swift_sampler.storage.errors import UsageError

SCHEDULES = ("multistep", "cosine", "one-cycle", "constant")


def multistep(t: float, *, lr: float, milestones: Sequence[int], gamma: float = 0.1,
              warmup: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` epochs, then step decay: ``lr * gamma ** (number of
    milestones <= t)``.

    The paper's recipe (section 4.1, CIFAR): lr 0.1 divided by 10 at epoch 40 of 80.
    Milestones are whole epochs, so the rate changes at epoch boundaries only. A small net
    started at lr 0.1 on noisy labels can diverge in its first epoch; a short warm-up avoids it.
    """
    if warmup > 0 and t < warmup:
        return lr * t / warmup
    passed = sum(1 for m in milestones if math.floor(t) >= m)
    return lr * gamma**passed


def cosine(t: float, *, lr: float, epochs: float, warmup: float = 0.0, min_lr: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` epochs, then cosine decay to ``min_lr`` at ``epochs``
    (Loshchilov & Hutter 2017, SGDR without restarts)."""
    if warmup > 0 and t < warmup:
        return lr * t / warmup
    span = max(epochs - warmup, 1e-12)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def one_cycle(t: float, *, lr: float, epochs: float, pct_start: float = 0.25,
              div_factor: float = 25.0, final_div_factor: float = 1e3) -> float:
    """One-cycle policy (Smith & Topin 2018), the two-phase form of ``torch.optim.lr_scheduler.
    OneCycleLR(anneal_strategy='linear')``: ``lr / div_factor`` rises linearly to ``lr`` over
    ``pct_start`` of training, then falls linearly to ``lr / (div_factor * final_div_factor)``.
    Suits short budgets (the ``cpu-quick`` preset)."""
    start = lr / div_factor
    end = start / final_div_factor
    peak_at = pct_start * epochs
    if t <= peak_at:
        return start + (lr - start) * (t / max(peak_at, 1e-12))
    progress = min((t - peak_at) / max(epochs - peak_at, 1e-12), 1.0)
    return lr + (end - lr) * progress


def constant(t: float, *, lr: float) -> float:
    return lr


def lr_at(t: float, *, schedule: str, lr: float, epochs: float, milestones: Sequence[int] = (),
          gamma: float = 0.1, warmup: float = 0.0) -> float:
    """Dispatch by name; ``t`` in epochs (float). Raises ``ValueError`` for an unknown name."""
    if schedule == "multistep":
        return multistep(t, lr=lr, milestones=milestones, gamma=gamma, warmup=warmup)
    if schedule == "cosine":
        return cosine(t, lr=lr, epochs=epochs, warmup=warmup)
    if schedule == "one-cycle":
        return one_cycle(t, lr=lr, epochs=epochs)
    if schedule == "constant":
        return constant(t, lr=lr)
    raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
