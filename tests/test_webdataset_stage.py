"""``keep_by_tau`` in a user's DataLoader over the store's own shards: a new draw every epoch
with 0, 1 or 2 workers, persistent or not; the same seeds give the same epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import swift_sampler
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage import StoreLayout, read_manifest, split_shards
from swift_sampler.storage.errors import UsageError

LOADERS = [(0, False), (1, False), (1, True), (2, False), (2, True)]


@pytest.fixture
def store(scored_digits):
    return scored_digits


def ramp(store) -> Sampler:
    return Sampler((0.0, 0.25, 0.5, 0.75, 1.0), (1.0, 0.8, 0.5, 0.3, 0.1), 0.7, -0.4, "cgf",
                   load_tables(store))


def urls(store) -> list[str]:
    layout = StoreLayout(store)
    return [str(p) for p, _ in split_shards(layout, read_manifest(layout), "train")]


def epochs(store, workers, persistent, *, seed=0, torch_seed=0, n=3, set_epoch=False, **kw):
    """The sorted kept keys of ``n`` epochs through a fresh stage and DataLoader."""
    torch.manual_seed(torch_seed)  # DataLoader workers' seeds come from torch's generator
    stage = swift_sampler.keep_by_tau(ramp(store), store, batch=32, seed=seed, **kw)
    ds = wds.WebDataset(urls(store), shardshuffle=False).compose(stage)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=persistent)
    out = []
    for epoch in range(n):
        if set_epoch:
            stage.set_epoch(epoch)
        out.append(sorted(s["__key__"] for s in loader))
    return out


@pytest.mark.parametrize("workers,persistent", LOADERS)
def test_each_epoch_draws_anew_and_the_same_seeds_repeat_the_run(store, workers, persistent):
    run = epochs(store, workers, persistent)
    assert len({tuple(keys) for keys in run}) == len(run)  # three different epochs
    assert all(len(set(keys)) == len(keys) for keys in run)
    assert epochs(store, workers, persistent) == run  # same seeds: same run
    assert epochs(store, workers, persistent, seed=1, n=1)[0] != run[0]


@pytest.mark.parametrize("workers,persistent", LOADERS)
def test_set_epoch_makes_each_epoch_a_function_of_seed_and_epoch(store, workers, persistent):
    run = epochs(store, workers, persistent, set_epoch=True)
    assert len({tuple(keys) for keys in run}) == len(run)
    # torch's seed no longer matters, and persistent workers see the epoch too.
    assert epochs(store, workers, persistent, set_epoch=True, torch_seed=7, n=2) == run[:2]
    if workers:
        assert epochs(store, workers, not persistent, set_epoch=True) == run
    if workers == 1:  # one worker reads the shards in the order the main process does
        assert epochs(store, 0, False, set_epoch=True) == run


def test_a_pickled_stage_keeps_its_epoch_and_draws_as_the_original(store):
    import pickle

    keys = sorted(swift_sampler.image_tau(ramp(store), store).keys)[:128]
    samples = [{"__key__": k} for k in keys]

    def stage_at(epoch):
        stage = swift_sampler.keep_by_tau(ramp(store), store, batch=32, seed=5)
        stage.set_epoch(epoch)
        return stage

    stage = stage_at(4)
    copy = pickle.loads(pickle.dumps(stage))
    stage.set_epoch(9)  # the copy shares nothing with the original
    kept = [s["__key__"] for s in copy(iter(samples))]
    assert kept == [s["__key__"] for s in stage_at(4)(iter(samples))]
    assert kept != [s["__key__"] for s in stage(iter(samples))]
    with pytest.raises(UsageError, match="epoch must be >= 0"):
        stage.set_epoch(-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_epoch_emits_as_many_samples_as_it_reads(store, workers):
    n = read_manifest(StoreLayout(store))["splits"]["train"]["count"]
    tau = swift_sampler.sampler_weights(ramp(store), store).by_key()
    for half, full in zip(epochs(store, workers, False, n=2),
                          epochs(store, workers, False, n=2, epoch_size="full")):
        assert len(half) < n // 2 + 2 * workers + 2  # the default: half an epoch
        assert len(full) == n  # every worker emits what it reads, windows and all
        assert max(full.count(k) for k in set(full)) <= 2 and all(tau[k] > 0 for k in full)
    # Equal tau: each sample exactly once per epoch, as uniform training sees it.
    from swift_sampler.pipeline.sampler.function import uniform_sampler

    flat = swift_sampler.keep_by_tau(uniform_sampler(load_tables(store)), store, batch=32,
                                     epoch_size="full")
    ds = wds.WebDataset(urls(store), shardshuffle=False).compose(flat)
    keys = [s["__key__"] for s in DataLoader(ds, batch_size=None, num_workers=workers)]
    assert sorted(keys) == sorted(tau)


def test_a_full_epoch_keeps_each_sample_with_its_two_candidates_probability(store):
    from swift_sampler.pipeline.sampler.filter import inclusion_probabilities

    stage = swift_sampler.keep_by_tau(ramp(store), store, batch=16, seed=3, epoch_size="full")
    keys = sorted(stage.tau)[:40]  # two windows of 16 samples and one of 8
    samples = [{"__key__": k} for k in keys]
    passes, counts = 1000, np.zeros(len(keys))
    for _ in range(passes):
        kept = list(stage(iter(samples)))
        assert len(kept) == len(keys)
        assert len({id(s) for s in kept}) == len(kept)  # a sample kept twice comes as two dicts
        np.add.at(counts, [keys.index(s["__key__"]) for s in kept], 1)
    pairs = np.repeat([stage.tau[k] for k in keys], 2)
    pi = np.concatenate([inclusion_probabilities(pairs[a:b], (b - a) // 2)
                         for a, b in ((0, 32), (32, 64), (64, 80))])
    # Per pass a sample comes 0, 1 or 2 times (sd <= 0.5 given pi): 5 sd of the mean.
    np.testing.assert_allclose(counts / passes, pi[0::2] + pi[1::2], atol=0.08)
    with pytest.raises(UsageError, match="epoch_size"):
        swift_sampler.keep_by_tau(ramp(store), store, epoch_size=2)


@pytest.mark.parametrize("batch", [2.5, "32", True, 0])
def test_a_batch_that_is_not_a_positive_integer_is_refused(store, batch):
    # 2.5 would keep 2 of every 5 candidates: 40%, not the half the stage promises.
    with pytest.raises(UsageError, match="batch must be an integer >= 1"):
        swift_sampler.keep_by_tau(ramp(store), store, batch=batch)
