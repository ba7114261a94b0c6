"""Label noise: parsing, realised rates, pair flips, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_sampler.pipeline.ingest.noise import (
    CIFAR10_CLASSES,
    NoiseSpec,
    NoiseSpecError,
    expected_rate,
    flip_targets,
    inject_noise,
    parse_noise,
)

DIGITS = [str(i) for i in range(10)]


def _labels(n_per_class, seed=0):
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("spec, expected", [
    ("none", NoiseSpec()), (None, NoiseSpec()), ("symmetric:0.4", NoiseSpec("symmetric", 0.4)),
    ("ASYMMETRIC:0.2", NoiseSpec("asymmetric", 0.2)), ("symmetric:1", NoiseSpec("symmetric", 1.0)),
])
def test_parse_accepts(spec, expected):
    assert parse_noise(spec) == expected
    assert parse_noise(str(expected)) == expected  # str() round-trips


@pytest.mark.parametrize("spec, words", [
    ("symmetric:1.5", "outside [0, 1]"), ("asymmetric:-0.1", "outside [0, 1]"),
    ("foo", "symmetric:R"), ("symmetric", "symmetric:R"), ("symmetric:x", "bad noise rate"),
    ("pairflip:0.2", "symmetric:R"),
])
def test_parse_rejects_with_clear_message(spec, words):
    with pytest.raises(NoiseSpecError) as e:
        parse_noise(spec)
    assert words in str(e.value) and repr(spec) in str(e.value)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=2, max_size=8),
       rate=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_symmetric_counts_per_class_and_total(sizes, rate, seed):
    labels = _labels(sizes, seed)
    classes = [f"c{i}" for i in range(len(sizes))]
    noisy = inject_noise(labels, spec=f"symmetric:{rate!r}", classes=classes, seed=seed)
    flipped = noisy != labels
    assert np.all((noisy >= 0) & (noisy < len(sizes)))
    # Each class flips floor or ceil of R * n_c, and the total is round(R * n) (largest remainder).
    for c, n_c in enumerate(sizes):
        assert abs(flipped[labels == c].sum() - rate * n_c) < 1 + 1e-9
    assert abs(flipped.sum() - rate * labels.size) <= 0.5 + 1e-9


def test_symmetric_moves_uniformly_to_other_classes():
    labels = _labels([2000] * 5)
    noisy = inject_noise(labels, spec="symmetric:0.5", classes=list("abcde"), seed=3)
    moved = noisy[(labels == 0) & (noisy != labels)]
    counts = np.bincount(moved, minlength=5)
    assert counts[0] == 0
    # 1000 draws over 4 classes: each near 250 (binomial sd ~14).
    assert np.all(np.abs(counts[1:] - 250) < 75)


def test_asymmetric_cifar10_pairs():
    labels = _labels([1000] * 10)
    noisy = inject_noise(labels, spec="asymmetric:0.3", classes=list(CIFAR10_CLASSES), seed=0)
    name = dict(enumerate(CIFAR10_CLASSES))
    pairs = {(name[a], name[b]) for a, b in zip(labels, noisy) if a != b}
    assert pairs == {("truck", "automobile"), ("bird", "airplane"), ("deer", "horse"),
                     ("cat", "dog"), ("dog", "cat")}
    for c in range(10):
        rate = np.mean(noisy[labels == c] != c)
        assert rate == (0.3 if name[c] in ("truck", "bird", "deer", "cat", "dog") else 0.0)
    realised = np.mean(noisy != labels)
    assert abs(realised - expected_rate(labels, spec="asymmetric:0.3",
                                        classes=list(CIFAR10_CLASSES))) < 1e-9


def test_asymmetric_other_sets_shift_by_one():
    assert flip_targets(DIGITS) == {c: (c + 1) % 10 for c in range(10)}
    labels = _labels([300] * 10)
    noisy = inject_noise(labels, spec="asymmetric:0.2", classes=DIGITS, seed=1)
    changed = noisy != labels
    assert np.all(noisy[changed] == (labels[changed] + 1) % 10)
    assert abs(changed.mean() - 0.2) <= 0.005


def test_same_seed_same_labels_different_seed_different():
    labels = _labels([200] * 10)
    a = inject_noise(labels, spec="symmetric:0.4", classes=DIGITS, seed=7)
    b = inject_noise(labels, spec="symmetric:0.4", classes=DIGITS, seed=7)
    c = inject_noise(labels, spec="symmetric:0.4", classes=DIGITS, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_none_and_extremes():
    labels = _labels([50] * 4)
    assert np.array_equal(inject_noise(labels, spec="none", classes=list("abcd")), labels)
    assert np.array_equal(inject_noise(labels, spec="symmetric:0", classes=list("abcd")), labels)
    assert np.all(inject_noise(labels, spec="symmetric:1", classes=list("abcd")) != labels)
