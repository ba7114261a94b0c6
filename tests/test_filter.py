"""Oversample-and-filter: inclusion frequencies of both keep rules (Efraimidis-Spirakis,
systematic PPS) vs exact probabilities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from swift_sampler.pipeline.sampler.filter import (
    FilterStats,
    es_keys,
    filter_candidates,
    inclusion_probabilities,
    select,
    select_systematic,
    select_torch,
    selection_rule,
)


def inclusion_exact(tau, keep):
    """P(i among the first ``keep`` draws) of sequential sampling without replacement ~ tau."""
    tau = np.asarray(tau, float)
    p = np.zeros(len(tau))
    for order in itertools.permutations(range(len(tau)), keep):
        prob, left = 1.0, tau.sum()
        for i in order:
            prob *= tau[i] / left
            left -= tau[i]
        p[list(order)] += prob
    return p


def test_first_pick_and_inclusion_frequencies():
    tau = np.array([0.05, 0.2, 1.0, 0.5, 0.0, 0.8])
    rng = np.random.default_rng(0)
    draws = 20000
    first = np.zeros(len(tau))
    kept = np.zeros(len(tau))
    for _ in range(draws):
        keys = es_keys(tau, rng)
        first[np.argmax(keys)] += 1
    for _ in range(draws):
        kept[select(tau, 3, rng)] += 1
    pos = tau > 0
    assert chisquare(first[pos], draws * tau[pos] / tau.sum()).pvalue > 1e-3
    expected = inclusion_exact(tau, 3)
    assert kept[4] == 0
    np.testing.assert_allclose(kept / draws, expected, atol=0.015)


def test_uniform_tau_keeps_uniformly():
    rng = np.random.default_rng(1)
    kept = np.zeros(8)
    for _ in range(8000):
        kept[select(np.ones(8), 4, rng)] += 1
    assert chisquare(kept).pvalue > 1e-3


def test_short_batch_keeps_only_positive():
    tau = np.array([0.0, 0.3, 0.0, 0.0, 0.9, 0.0])
    idx = select(tau, 3, np.random.default_rng(0))
    assert idx.tolist() == [1, 4]
    stats = FilterStats()
    groups = [[{"tau": t, "i": i} for i, t in enumerate(tau)], [{"tau": 1.0, "i": i} for i in range(6)]]
    out = list(filter_candidates(iter(groups), keep_ratio=0.5, seed=0, stats=stats))
    assert [c["i"] for c in out[0]] == [1, 4] and len(out[1]) == 3
    assert stats.short_batches == 1 and stats.kept_fraction == 5 / 12


def test_stage_same_seed_same_result_and_columns():
    batch = {"tau": np.linspace(0, 1, 16), "x": torch.arange(16), "name": [str(i) for i in range(16)]}
    a = next(filter_candidates(iter([batch]), seed=3))
    b = next(filter_candidates(iter([batch]), seed=3))
    assert a["x"].tolist() == b["x"].tolist() and len(a["name"]) == 8
    assert a["name"] == [str(i) for i in a["x"].tolist()] and 0 not in a["x"].tolist()


def test_torch_select():
    g = torch.Generator().manual_seed(0)
    tau = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0])
    counts = torch.zeros(5)
    for _ in range(2000):
        counts[select_torch(tau, 2, g)] += 1
    assert counts[0] == 0 and counts[3] == 0
    np.testing.assert_allclose(counts.numpy() / 2000, inclusion_exact(tau.numpy(), 2), atol=0.04)
    with pytest.raises(ValueError):
        select(np.array([-1.0]), 1, np.random.default_rng(0))


# -- systematic PPS (the default keep rule) ------------------------------------------------------
def capped_shares(tau, keep):
    """Slow reference for ``inclusion_probabilities``: bisect ``c`` in sum(min(1, c tau)) = k."""
    tau = np.asarray(tau, float)
    k = min(keep, int((tau > 0).sum()))
    lo, hi = 0.0, 1e12
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(1.0, c * tau).sum() < k else (lo, c)
    return np.minimum(1.0, hi * tau)


@pytest.mark.parametrize("tau,keep", [
    ([0.05, 0.2, 1.0, 0.5, 0.0, 0.8], 3),
    ([1.0, 1.0, 1.0, 1.0], 2),
    ([10.0, 0.1, 0.1, 0.1, 0.1, 5.0], 3),  # two capped at 1, solved again for the rest
    ([0.0, 2.0, 0.0, 1.0], 3),  # fewer positive than keep: all of them, certainly
])
def test_systematic_keeps_with_the_capped_proportional_probabilities(tau, keep):
    tau = np.asarray(tau)
    pi = inclusion_probabilities(tau, keep)
    assert np.allclose(pi, capped_shares(tau, keep), atol=1e-9)
    rng = np.random.default_rng(0)
    draws, kept = 20000, np.zeros(len(tau))
    k = min(keep, int((tau > 0).sum()))
    for _ in range(draws):
        idx = select_systematic(tau, keep, rng)
        assert len(idx) == len(set(idx.tolist())) == k and np.all(np.diff(idx) > 0)
        kept[idx] += 1
    assert np.all(kept[tau == 0] == 0)
    assert np.abs(kept / draws - pi).max() < 0.015  # binomial sd <= 0.0036


def test_systematic_draws_the_two_candidates_of_an_image_together():
    # Two candidates per image, side by side: flat tau keeps exactly one of each pair (an
    # epoch over every image); es keeps 0, 1 or 2 of a pair.
    rng = np.random.default_rng(1)
    for _ in range(200):
        per_image = np.bincount(select_systematic(np.ones(64), 32, rng) // 2, minlength=32)
        assert np.all(per_image == 1)
    es = np.concatenate([np.bincount(select(np.ones(64), 32, rng) // 2, minlength=32) for _ in range(200)])
    assert 0.15 < np.mean(es == 0) < 0.35 and np.mean(es == 2) > 0.15
    # An image the sampler prefers (both crops share > 1/2) keeps both, one at 0 keeps none.
    tau = np.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    for _ in range(50):
        idx = select_systematic(tau, 4, rng)
        assert {0, 1} <= set(idx.tolist()) and not {2, 3} & set(idx.tolist())
        assert np.bincount(idx // 2, minlength=4)[2:].tolist() == [1, 1]


def test_systematic_same_seed_same_result_and_checks_its_input():
    tau = np.random.default_rng(5).random(50)
    a = select_systematic(tau, 20, np.random.default_rng(9))
    assert np.array_equal(a, select_systematic(tau, 20, np.random.default_rng(9)))
    assert select_systematic(np.zeros(4), 2, np.random.default_rng(0)).size == 0
    with pytest.raises(ValueError, match=">= 0"):
        select_systematic(np.array([1.0, -1.0]), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown selection"):
        selection_rule("reservoir")
