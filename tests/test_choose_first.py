"""The sampler stage chooses before it decodes: same batches as choosing after cutting, for a
seed, and never a tau-0 crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.train.loader import ShardDataset
from swift_sampler.train.sampling import StoredCrops, tau_filter


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.train.models import create_model

    store = tmp_path_factory.mktemp("choose") / "store"
    ingest("digits", store, val_frac=0.2, test_frac=0.2, noise="symmetric:0.4", shard_size=200,
           progress=False)
    torch.manual_seed(0)
    build_features(store, create_model("digits-net", 10, 1, 8), crops_per_image=4,
                   progress=False, device="cpu", quantiles=32, angles=8)
    return store


def batches(store, sampler, *, choose_first, epochs=2, seed=3):
    ds = ShardDataset(store, "train", batch_size=32, train=True, seed=seed, num_workers=0,
                      candidates_per_image=2, crop_stage=StoredCrops(store, sampler),
                      batch_filter=tau_filter, choose_first=choose_first, shuffle_buffer=64)
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out += list(ds)
    return out


@pytest.mark.parametrize("shape", ["step", "ramp"])
def test_choose_first_gives_the_same_batches_as_filtering_after_the_cut(scored, shape):
    tables = load_tables(scored)
    sampler = (Sampler((0.0, 0.5, 0.5, 1.0, 1.0), (1, 1, 0, 0, 0), 1.0, 0.0, "cgf", tables)
               if shape == "step" else
               Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1, 0.8, 0.5, 0.3, 0.1), 0.7, -0.4, "cgf", tables))
    fast = batches(scored, sampler, choose_first=True)
    slow = batches(scored, sampler, choose_first=False)
    assert len(fast) == len(slow) > 0
    for a, b in zip(fast, slow):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_choose_first_never_keeps_a_tau_0_crop_and_keeps_in_proportion(scored):
    tables = load_tables(scored)
    step = Sampler((0.0, 0.5, 0.5, 1.0, 1.0), (1, 1, 0, 0, 0), 1.0, 0.0, "cgf", tables)
    stage = StoredCrops(scored, step)
    got = batches(scored, step, choose_first=True, epochs=3)
    kept_tau = torch.cat([b["tau"] for b in got])
    assert (kept_tau > 0).all()
    assert all(b["candidates"] == 64 for b in got)
    # With tau in {0, 1}: among positive candidates every one is equally likely, so a crop's
    # chance of being kept depends on nothing but tau; the kept crops' stored ids are uniform.
    ids = torch.cat([b["crop_id"] for b in got]).numpy()
    counts = np.bincount(ids, minlength=stage.k)
    from scipy.stats import chisquare

    positive = (stage.tau > 0).sum(axis=0)  # per crop id: images where that crop has tau > 0
    expected = positive / positive.sum() * counts.sum()
    assert chisquare(counts, expected).pvalue > 0.001
