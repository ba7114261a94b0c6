"""The detection study: per-class percentiles and the kept shares against slow references, and a
run over a store with features and dynamics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bench_detection import detection, main, per_class_percentile
from test_loader import make_store

from swift_sampler.train.presets import resolve_config
from swift_sampler.train.trainer import train


def test_per_class_percentile_matches_counting():
    rng = np.random.default_rng(0)
    score = rng.normal(size=60).round(1)  # ties on purpose
    labels = rng.integers(0, 3, size=60)
    got = per_class_percentile(score, labels)
    for i in range(60):
        same = score[labels == labels[i]]
        below = (same < score[i]).sum() + ((same == score[i]).sum() + 1) / 2
        assert got[i] == pytest.approx(below / same.size)


def test_kept_share_is_the_flipped_share_of_the_lowest_scores():
    score = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.5, 1.0])
    flipped = np.array([0, 1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    out = detection(score, flipped)
    # kept 50%: 0.1 0.2 0.3 0.4 0.5 -> one flipped of five
    assert out["flipped_in_kept_0.5"] == 0.2
    # kept 70%: + 0.6 0.7 -> one of seven
    assert out["flipped_in_kept_0.7"] == round(1 / 7, 4)
    pairs = [(a, b) for a in score[flipped] for b in score[~flipped]]
    assert out["auc"] == round(np.mean([a > b for a, b in pairs]), 4)


def test_the_study_reads_features_and_dynamics_of_a_store(tmp_path, capsys):
    import swift_sampler as ss

    torch.set_num_threads(1)
    store = make_store(tmp_path / "s", splits={"train": 48, "val": 16}, classes=4, shard_size=16,
                       noise=0.3)
    config = resolve_config(store, name="w", model="digits-net", epochs=2, batch_size=8,
                            lr=0.05, workers=0, progress=False)
    ss.build_features(store, train(config)["checkpoint"], crops_per_image=2, progress=False,
                      workers=0)
    assert main(["--store", f"toy={store}", "--out", str(tmp_path / "out")]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]["toy"]
    assert doc["images"] == 48
    assert set(doc["features"]) == {"loss", "entropy_r", "grad_norm", "loss_mean", "loss_ema",
                                    "margin_mean", "prob_mean", "prob_std", "disagree_epochs",
                                    "learned_epoch"}
    for v in doc["features"].values():
        assert 0.0 <= v["global"]["auc"] <= 1.0 and 0.0 <= v["per_class"]["auc"] <= 1.0
    assert "| loss_mean |" in (tmp_path / "out" / "README.md").read_text()
