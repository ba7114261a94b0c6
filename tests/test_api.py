"""The public API: the package docstring's walk through the method, and a learned sampler in
the user's own loop (per-image weights for a map-style dataset, a WebDataset stage)."""

from __future__ import annotations

import doctest

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
import webdataset as wds

import swift_sampler
from swift_sampler.pipeline.sampler.file import save_sampler
from swift_sampler.pipeline.sampler.function import Sampler, uniform_sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage import StoreError, StoreLayout, read_manifest, split_shards
from swift_sampler.storage.errors import UsageError


def test_package_docstring_walks_the_whole_method():
    result = doctest.testmod(swift_sampler, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Digits with a short w_share, features (2 crops per image) and tables."""
    store = tmp_path_factory.mktemp("api") / "store"
    swift_sampler.ingest("digits", store, noise="symmetric:0.4", val_frac=0.2, test_frac=0.2,
                         shard_size=400, progress=False)
    ckpt = swift_sampler.train_model(store, "w_share", epochs=2, workers=0, progress=False)["checkpoint"]
    swift_sampler.build_features(store, ckpt, crops_per_image=2, progress=False, device="cpu")
    return store


def step_sampler(store, cut=0.5) -> Sampler:
    return Sampler((0.0, cut, cut, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0), 1.0, 0.0, "cgf",
                   load_tables(store))


def test_sampler_weights_are_the_mean_tau_of_each_images_crops(scored, tmp_path):
    sampler = step_sampler(scored)
    path = tmp_path / "s.json"
    save_sampler(path, sampler, {"store_id": read_manifest(StoreLayout(scored))["store_id"]})
    w = swift_sampler.sampler_weights(path, scored)
    # Slow reference: the parts and the samples table read directly, a Python loop per crop.
    parts = pads.dataset(StoreLayout(scored).features_dir, format="parquet",
                         exclude_invalid_files=True).to_table(columns=["index", "loss", "entropy_r"])
    sums, counts = {}, {}
    for i, loss, er in zip(*(parts.column(c).to_pylist() for c in ("index", "loss", "entropy_r"))):
        t = float(sampler.tau(np.array([loss]), np.array([er]), precise=True)[0])
        sums[i] = sums.get(i, 0.0) + t
        counts[i] = counts.get(i, 0) + 1
    np.testing.assert_allclose(w.weights, [sums[i] / counts[i] for i in range(len(counts))], atol=1e-6)
    samples = pads.dataset(StoreLayout(scored).samples).to_table().to_pylist()
    train_keys = {r["index"]: r["key"] for r in samples if r["split"] == "train"}
    assert w.keys.tolist() == [train_keys[i] for i in range(len(train_keys))]
    assert 0 < (w.weights == 0).mean() < 1  # the step drops some images entirely

    # In a plain DataLoader: images of weight 0 are never drawn.
    draws = list(torch.utils.data.WeightedRandomSampler(torch.as_tensor(w.weights), 5000,
                                                        generator=torch.Generator().manual_seed(0)))
    assert set(draws) <= set(np.flatnonzero(w.weights > 0).tolist())


def test_all_zero_weights_are_refused(scored):
    zero = Sampler((0, 0.25, 0.5, 0.75, 1), (0, 0, 0, 0, 0), 1.0, 0.0, "cgf", load_tables(scored))
    with pytest.raises(StoreError, match="weight 0 to every image"):
        swift_sampler.sampler_weights(zero, scored)


def _urls(store):
    layout = StoreLayout(store)
    return [str(p) for p, _ in split_shards(layout, read_manifest(layout), "train")]


def test_webdataset_stage_keeps_half_never_a_zero_tau_image_same_seed_same_result(scored):
    sampler = step_sampler(scored)
    weights = swift_sampler.sampler_weights(sampler, scored).by_key()

    def kept(seed, passes=1):
        stage = swift_sampler.keep_by_tau(sampler, scored, batch=64, seed=seed)
        for _ in range(passes):
            keys = [s["__key__"] for s in wds.WebDataset(_urls(scored), shardshuffle=False).compose(stage)]
        return keys

    a, b, c = kept(0), kept(0), kept(1)
    assert kept(0, passes=2) != a  # the next epoch draws anew
    n = sum(1 for _ in wds.WebDataset(_urls(scored), shardshuffle=False))
    assert a == b and a != c
    assert all(weights[k] > 0 for k in a)
    assert len(a) <= n // 2 + 1 and len(set(a)) == len(a)


def test_webdataset_stage_draws_in_proportion_to_tau(scored):
    # The uniform sampler keeps exactly half of each window, every key equally likely; each pass
    # (epoch) draws anew.
    stage = swift_sampler.keep_by_tau(uniform_sampler(load_tables(scored)), scored, batch=32, seed=0)
    counts = {}
    for _ in range(20):
        for s in wds.WebDataset(_urls(scored), shardshuffle=False).compose(stage):
            counts[s["__key__"]] = counts.get(s["__key__"], 0) + 1
    n = sum(1 for _ in wds.WebDataset(_urls(scored), shardshuffle=False))
    assert sum(counts.values()) == 20 * (n // 64 * 32 + (n % 64) // 2)
    share = np.array(list(counts.values())) / 20
    assert len(counts) == n  # over 20 passes every image was kept at least once
    # Binomial(20, ~0.5) per key: sd of the share about 0.11.
    assert 0.05 < share.std() < 0.2 and share.min() > 0 and share.max() < 1


def test_webdataset_stage_refuses_unknown_keys_unless_told(scored):
    sampler = uniform_sampler(load_tables(scored))
    strict = swift_sampler.keep_by_tau(sampler, scored, batch=2)
    with pytest.raises(StoreError, match="not a train image of the store"):
        list(strict(iter([{"__key__": "nope"}] * 4)))
    lenient = swift_sampler.keep_by_tau(sampler, scored, batch=2, unknown="keep")
    assert len(list(lenient(iter([{"__key__": "nope"}] * 4)))) == 2 and lenient.unknown_count == 4


def test_webdataset_stage_keeps_each_sample_with_its_inclusion_probability(scored):
    from swift_sampler.pipeline.sampler.filter import inclusion_probabilities

    sampler = step_sampler(scored, cut=0.7)
    stage = swift_sampler.keep_by_tau(sampler, scored, batch=16, seed=3)
    tau = stage.tau
    keys = sorted(tau)[:64]  # two windows of 32
    samples = [{"__key__": k} for k in keys]
    passes = 3000
    counts = np.zeros(len(keys))
    for _ in range(passes):
        kept = [s["__key__"] for s in stage(iter(samples))]
        assert len(kept) == 32  # every window keeps exactly its batch
        counts[[keys.index(k) for k in kept]] += 1
    t = np.array([tau[k] for k in keys])
    pi = np.concatenate([inclusion_probabilities(t[:32], 16), inclusion_probabilities(t[32:], 16)])
    # Binomial(3000, pi): sd <= 0.0092 per key; 5 sd.
    np.testing.assert_allclose(counts / passes, pi, atol=0.046)
    assert counts[t == 0].sum() == 0
    # The uniform sampler keeps exactly half of every window, each sample with probability 1/2.
    flat = swift_sampler.keep_by_tau(uniform_sampler(load_tables(scored)), scored, batch=16, seed=0)
    seen = np.zeros(len(keys))
    for _ in range(400):
        kept = [s["__key__"] for s in flat(iter(samples))]
        assert len(kept) == 32
        seen[[keys.index(k) for k in kept]] += 1
    np.testing.assert_allclose(seen / 400, 0.5, atol=0.125)  # 5 sd of Binomial(400, 1/2)
    es = swift_sampler.keep_by_tau(sampler, scored, batch=16, seed=3, selection="es")
    assert len(list(es(iter(samples)))) == 32
    with pytest.raises(UsageError, match="selection"):
        swift_sampler.keep_by_tau(sampler, scored, selection="nearest")
