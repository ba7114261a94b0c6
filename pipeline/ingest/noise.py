"""Synthetic label noise, injected the way label-noise papers (and Swift Sampler's
experiments) do it.

- ``symmetric:R``: in each class, a fraction R of the instances is drawn (seeded) and each
  drawn label moves uniformly to one of the *other* classes.
- ``asymmetric:R``: class-pair flips. For CIFAR-10 (recognised by its class names) the usual
  pairs truck->automobile, bird->airplane, deer->horse, cat<->dog; for any other set of
  classes c -> c+1 mod C. A fraction R of each source class of a pair is flipped.

Counts are allocated by largest remainder over classes, so the realised rate of a split is
within 1/(2n) of its expectation (R for symmetric; R times the share of source classes for
asymmetric). Noise applies to train and val, never to test (``pipeline.ingest.build`` decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from swift_sampler.storage.errors import SwiftSamplerError

NOISE_KINDS = ("none", "symmetric", "asymmetric")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_PAIRS = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog",
                 "dog": "cat"}


class NoiseSpecError(SwiftSamplerError, ValueError):
    """A ``--noise`` value could not be parsed; the message shows the accepted forms."""


@dataclass(frozen=True)
class NoiseSpec:
    """Parsed noise specification: ``kind`` in NOISE_KINDS, ``rate`` in [0, 1]."""

    kind: str = "none"
    rate: float = 0.0

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.rate:g}"


def parse_noise(spec: str | NoiseSpec | None) -> NoiseSpec:
    """Parse ``none``, ``symmetric:R`` or ``asymmetric:R`` (0 <= R <= 1)."""
    if isinstance(spec, NoiseSpec):
        return spec
    text = (spec or "none").strip().lower()
    if text in ("none", "0", ""):
        return NoiseSpec()
    kind, sep, rate_text = text.partition(":")
    if kind not in NOISE_KINDS[1:] or not sep:
        raise NoiseSpecError(
            f"bad noise spec {spec!r}: use none, symmetric:R or asymmetric:R with 0 <= R <= 1 "
            "(e.g. symmetric:0.4)"
        )
    try:
        rate = float(rate_text)
    except ValueError:
        raise NoiseSpecError(f"bad noise rate {rate_text!r} in {spec!r}: expected a number "
                             "between 0 and 1, e.g. symmetric:0.4") from None
    if not 0.0 <= rate <= 1.0:
        raise NoiseSpecError(f"noise rate {rate:g} in {spec!r} is outside [0, 1]; "
                             "a rate is a fraction, e.g. symmetric:0.4")
    return NoiseSpec(kind, rate)


def flip_targets(classes: list[str] | tuple[str, ...]) -> dict[int, int]:
    """Asymmetric flips as {source class: target class}."""
    names = list(classes)
    if sorted(names) == sorted(CIFAR10_CLASSES):
        return {names.index(s): names.index(t) for s, t in CIFAR10_PAIRS.items()}
    n = len(names)
    return {c: (c + 1) % n for c in range(n)} if n > 1 else {}


def inject_noise(labels: np.ndarray, *, spec: str | NoiseSpec, classes: list[str],
                 seed: int | np.random.Generator = 0) -> np.ndarray:
    """Return noisy labels for clean ``labels``.

    Args:
        labels: int array (n,) of clean labels in [0, len(classes)).
        spec: the noise specification (see ``parse_noise``).
        classes: class names; they pick the asymmetric pairs.
        seed: seed or generator; the same seed and labels give the same result.

    Returns:
        int64 array (n,). ``result != labels`` marks exactly the flipped instances, and a
        flipped label never equals its clean label.
    """
    spec = parse_noise(spec)
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    n_classes = len(classes)
    if spec.kind == "none" or spec.rate == 0.0 or labels.size == 0:
        return out
    if n_classes < 2:
        raise NoiseSpecError("label noise needs at least two classes")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    targets = flip_targets(classes) if spec.kind == "asymmetric" else None
    sources = sorted(targets) if targets is not None else list(range(n_classes))
    members = {c: np.flatnonzero(labels == c) for c in sources}
    counts = _allocate({c: spec.rate * len(m) for c, m in members.items()})
    for c in sources:
        chosen = rng.choice(members[c], size=min(counts[c], len(members[c])), replace=False)
        if targets is not None:
            out[chosen] = targets[c]
        else:
            # An offset in 1..C-1 makes the new label uniform over the other classes.
            out[chosen] = (c + rng.integers(1, n_classes, size=len(chosen))) % n_classes
    return out


def expected_rate(labels: np.ndarray, *, spec: str | NoiseSpec, classes: list[str]) -> float:
    """The fraction of ``labels`` that ``inject_noise`` is meant to flip."""
    spec = parse_noise(spec)
    labels = np.asarray(labels)
    if spec.kind == "none" or labels.size == 0:
        return 0.0
    if spec.kind == "symmetric":
        return spec.rate
    share = np.isin(labels, list(flip_targets(classes))).mean()
    return float(spec.rate * share)


def _allocate(quotas: dict[int, float]) -> dict[int, int]:
    # Largest remainder: the total is round(sum of quotas) and each class gets floor or ceil.
    floors = {c: int(np.floor(q)) for c, q in quotas.items()}
    total = int(np.floor(sum(quotas.values()) + 0.5))
    order = sorted(quotas, key=lambda c: (-(quotas[c] - floors[c]), c))
    for c in order[: max(0, total - sum(floors.values()))]:
        floors[c] += 1
    return floors
