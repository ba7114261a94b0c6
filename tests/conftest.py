"""Shared fixtures: tiny stores made on the fly (no network, no checked-in data)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples, so a run is reproducible.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Two cores are shared by the suite: keep intra-op threads low so tests stay predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10", "train")


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory):
    """Digits with 40% symmetric noise on train/val; read-only for tests (copy to modify)."""
    from swift_sampler.pipeline.ingest.build import ingest

    store = tmp_path_factory.mktemp("digits") / "store"
    ingest("digits", store, val_frac=0.2, test_frac=0.2, noise="symmetric:0.4", seed=0,
           shard_size=400, progress=False)
    return store


@pytest.fixture(scope="session")
def scored_digits(tmp_path_factory):
    """Digits in six train shards, scored by an untrained digits-net (2 crops per image), with
    tables; read-only for tests (copy to modify)."""
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.train.models import create_model

    store = tmp_path_factory.mktemp("scored") / "store"
    ingest("digits", store, val_frac=0.2, test_frac=0.2, noise="symmetric:0.4", shard_size=200,
           progress=False)
    torch.manual_seed(0)
    build_features(store, create_model("digits-net", 10, 1, 8), crops_per_image=2, workers=0,
                   progress=False, device="cpu", quantiles=32, angles=8)
    return store


@pytest.fixture(scope="session")
def shared_cifar():
    path = os.path.abspath(SHARED_CIFAR)
    if not os.path.isdir(path):
        pytest.skip("shared CIFAR-10 not found beside the checkout")
    return path


@pytest.fixture(scope="module")
def tables():
    """Feature tables of 2,000 synthetic crops (the search tests' samplers need some)."""
    import numpy as np

    from swift_sampler.pipeline.sampler.table_build import build_tables

    rng = np.random.default_rng(0)
    n = 2000
    return build_tables(rng.gamma(2.0, 1.0, n), rng.uniform(0, 1, n), rng.gamma(1.0, 1.0, n) + 0.01,
                        quantiles=32, angles=16, bins=16)
