"""The sampler stage chooses before it decodes: same batches as choosing after cutting, for a
seed, and never a tau-0 crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.train.loader import ShardDataset
from swift_sampler.train.sampling import TAU_FILTERS, StoredCrops


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


def batches(store, sampler, *, choose_first, epochs=2, seed=3, selection="systematic"):
    ds = ShardDataset(store, "train", batch_size=32, train=True, seed=seed, num_workers=0,
                      candidates_per_image=2,
                      crop_stage=StoredCrops(store, sampler, selection=selection),
                      batch_filter=TAU_FILTERS[selection], choose_first=choose_first,
                      shuffle_buffer=64)
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out += list(ds)
    return out


@pytest.mark.parametrize("selection", ["systematic", "es"])
@pytest.mark.parametrize("shape", ["step", "ramp"])
def test_choose_first_gives_the_same_batches_as_filtering_after_the_cut(scored, shape, selection):
    tables = load_tables(scored)
    sampler = (Sampler((0.0, 0.5, 0.5, 1.0, 1.0), (1, 1, 0, 0, 0), 1.0, 0.0, "cgf", tables)
               if shape == "step" else
               Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1, 0.8, 0.5, 0.3, 0.1), 0.7, -0.4, "cgf", tables))
    fast = batches(scored, sampler, choose_first=True, selection=selection)
    slow = batches(scored, sampler, choose_first=False, selection=selection)
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


@pytest.mark.parametrize("choose_first", [True, False])
def test_flat_sampler_shows_every_image_once_per_epoch(scored, choose_first):
    # The uniform sampler through the stage trains like uniform sampling: each batch is B
    # distinct images and an epoch never shows one twice (es would skip ~1/4 and repeat ~1/4).
    tables = load_tables(scored)
    flat = Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1.0,) * 5, 0.0, 0.0, "cgf", tables)
    for epoch_batches in (batches(scored, flat, choose_first=choose_first, epochs=1, seed=s)
                          for s in (0, 1)):
        seen = torch.cat([b["index"] for b in epoch_batches]).numpy()
        assert len(seen) == 32 * len(epoch_batches) > 0
        assert len(np.unique(seen)) == len(seen)
    es = batches(scored, flat, choose_first=choose_first, epochs=1, selection="es")
    seen = torch.cat([b["index"] for b in es]).numpy()
    assert len(np.unique(seen)) < 0.9 * len(seen)


@pytest.mark.parametrize("selection", ["systematic", "es"])
def test_online_filter_keeps_half_by_the_frozen_models_tau(scored, selection):
    from swift_sampler.pipeline.features.scoring import cross_entropy, entropy_r
    from swift_sampler.pipeline.sampler.filter import select_systematic
    from swift_sampler.train.models import create_model
    from swift_sampler.train.sampling import OnlineFilter, keep_all

    tables = load_tables(scored)
    step = Sampler((0.0, 0.5, 0.5, 1.0, 1.0), (1, 1, 0, 0, 0), 1.0, 0.0, "cgf", tables)
    ds = ShardDataset(scored, "train", batch_size=32, train=True, seed=0, num_workers=0,
                      candidates_per_image=2, batch_filter=keep_all)
    ds.set_epoch(0)
    batch = next(iter(ds))
    assert len(batch["index"]) == 64
    torch.manual_seed(0)
    scorer = create_model("digits-net", 10, 1, 8).eval()
    out = OnlineFilter(scorer, step, keep=32, device=torch.device("cpu"), seed=7,
                       selection=selection)(batch)
    with torch.no_grad():
        logits = scorer(batch["image"])
    tau = step.tau_torch(cross_entropy(logits, batch["label"]), entropy_r(logits, batch["label"]),
                         dtype=torch.float32)
    assert out["candidates"] == 64 and len(out["index"]) == min(32, int((tau > 0).sum()))
    # rows stay aligned and only positive-tau candidates are kept
    pos = [int(torch.nonzero((batch["image"] == img).flatten(1).all(1)).flatten()[0]) for img in out["image"]]
    assert torch.equal(batch["label"][pos], out["label"]) and bool((tau[pos] > 0).all())
    if selection == "systematic":  # the draw is select_systematic on that tau, seeded as given
        want = select_systematic(tau.numpy(), 32, np.random.default_rng(7))
        assert torch.equal(out["index"], batch["index"][torch.from_numpy(want)])


def test_image_features_train_fresh_crops_with_their_images_mean_tau(scored):
    from swift_sampler.pipeline.sampler.image_weights import image_tau
    from swift_sampler.storage.errors import UsageError
    from swift_sampler.train.sampling import create_sampler_hook

    tables = load_tables(scored)
    ramp = Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1, 0.8, 0.5, 0.0, 0.0), 1.0, 0.0, "cgf", tables)
    weights = image_tau(ramp, scored).weights
    assert (weights == 0).any() and (weights > 0).any()
    hook = create_sampler_hook(scored, ramp, features="image", seed=0)
    assert hook.describe == {"selection": "systematic"}
    ds = ShardDataset(scored, "train", batch_size=32, train=True, seed=0, num_workers=0,
                      candidates_per_image=2, crop_stage=hook.crop_stage,
                      batch_filter=hook.batch_filter, shuffle_buffer=64)
    got = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        got += list(ds)
    index = torch.cat([b["index"] for b in got]).numpy()
    assert np.allclose(torch.cat([b["tau"] for b in got]).numpy(), weights[index], atol=1e-6)
    assert (torch.cat([b["crop_id"] for b in got]) == -1).all()  # fresh crops, not stored ones
    assert (weights[index] > 0).all()
    # kept in proportion to the weight: the heaviest third of the images is seen more often
    seen = np.bincount(index, minlength=len(weights))
    positive = weights > 0
    median = np.median(weights[positive])
    heavy, light = weights > median, positive & (weights <= median)
    assert heavy.any() and light.any()  # the ramp gives both, so the comparison always runs
    assert seen[heavy].mean() > seen[light].mean()
    zero = Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (0.0,) * 5, 1.0, 0.0, "cgf", tables)
    with pytest.raises(UsageError, match="zero for every image"):
        create_sampler_hook(scored, zero, features="image")
