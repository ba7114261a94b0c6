"""The ranking diagnostic against slow, obvious references."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from bench_checkpoint_ranking import loss_steps, ranking


def test_ranking_is_the_pairwise_auc_and_the_kept_set_is_the_lowest_loss():
    rng = np.random.default_rng(0)
    flipped = rng.random(60) < 0.4
    loss = rng.random(60) + flipped * 0.5
    # AUC: the share of (flipped, clean) pairs the loss orders right, ties counting half
    pairs = [(a, b) for a, b in itertools.product(loss[flipped], loss[~flipped])]
    auc = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    out = ranking(loss, flipped, [0.5])
    assert out["auc"] == pytest.approx(auc, abs=1e-4)
    lowest = sorted(range(60), key=lambda i: loss[i])[:30]
    assert out["flipped_in_kept_0.5"] == pytest.approx(flipped[lowest].mean(), abs=1e-4)


def test_a_loss_step_in_cgf_counts_the_crops_below_its_cut():
    # four crops of images 0..3 sorted by loss; gradient norms 1, 1, 2, 4: t = 1/8, 2/8, 4/8, 1
    crops = pa.table({"index": [2, 0, 3, 1], "loss": [0.3, 0.1, 0.4, 0.2],
                      "grad_norm": [2.0, 1.0, 4.0, 1.0]})
    flipped_by_index = np.array([False, False, True, False])  # image 2's label is flipped
    steps = loss_steps(crops, flipped_by_index, [0.2, 0.3, 0.9])
    # t < 0.2: image 0 alone; t < 0.3: images 0, 1; t < 0.9: 0, 1, 2 (one flipped of three)
    assert [s["eligible"] for s in steps] == [0.25, 0.5, 0.75]
    assert [s["flipped_in_eligible"] for s in steps] == [0.0, 0.0, pytest.approx(1 / 3, abs=1e-4)]
