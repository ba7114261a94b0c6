"""Any two features: the pair's names and records, a cdf within each given label, the nulls of
the training dynamics, and a sampler over a dynamics pair through its file, training and the
search; a store that lacks a sampler's feature is refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import swift_sampler
from swift_sampler.pipeline.sampler.file import (
    check_not_all_zero,
    load_sampler,
    sampler_to_dict,
    save_sampler,
)
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.pair import (
    CROP_FEATURES,
    DEFAULT_PAIR,
    IMAGE_FEATURES,
    FeaturePair,
    read_pair_columns,
)
from swift_sampler.pipeline.sampler.table_build import build_tables
from swift_sampler.pipeline.sampler.table_store import build_store_tables, load_tables
from swift_sampler.storage import StoreError, StoreLayout, UsageError, read_manifest

DYNAMICS_PAIR = FeaturePair(("loss_mean", "margin_mean"))


def run_cli(*argv):
    from swift_sampler.cli import main

    return main([str(a) for a in argv])


def exact_cdf(x: np.ndarray) -> np.ndarray:
    """Fraction of rows <= x, by sorting (equation 7)."""
    return np.searchsorted(np.sort(x), x, side="right") / x.size


def step(tables, c1=1.0, c2=0.0, cut=0.5) -> Sampler:
    """Keep the crops whose t is below ``cut``."""
    return Sampler((0.0, cut, cut, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0), c1, c2, "cgf", tables)


def test_the_pair_names_known_features_and_defaults_to_the_papers():
    from swift_sampler.storage.schemas import FEATURES
    from swift_sampler.train.dynamics import COLUMNS

    assert DEFAULT_PAIR.features == ("loss", "entropy_r") and DEFAULT_PAIR.cdf_by == "global"
    assert set(CROP_FEATURES) <= set(FEATURES.names) and set(IMAGE_FEATURES) <= set(COLUMNS)
    assert FeaturePair.parse(" loss_mean,margin_mean ", "class") == FeaturePair(("loss_mean", "margin_mean"), "class")
    assert FeaturePair.from_record({}) == DEFAULT_PAIR  # written before pairs existed
    assert FeaturePair.from_record(DYNAMICS_PAIR.record()) == DYNAMICS_PAIR
    for text, match in (("loss,true_label", "'true_label'"), ("loss", "two"), ("loss,loss", "twice"),
                        ("loss,epochs_seen", "'epochs_seen'")):
        with pytest.raises(UsageError, match=match):
            FeaturePair.parse(text)
    with pytest.raises(UsageError, match="cdf_by"):
        FeaturePair(cdf_by="image")


def test_class_cdf_is_uniform_within_every_class():
    """Three classes of very different loss: globally the hard class sits at the top of the cdf,
    by class each is spread evenly over [0, 1]."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    loss = (rng.gamma(1.0, 1.0, 3000) + 5.0 * labels).astype(np.float32)
    er = rng.uniform(0, 2, 3000).astype(np.float32)
    w = (rng.uniform(0.1, 1, 3000)).astype(np.float32)
    q = 64
    pair = FeaturePair(("loss", "entropy_r"), "class")
    tab = build_tables(loss, er, w, pair=pair, labels=labels, quantiles=q, angles=8, bins=16)
    assert tab.cdf_knots["loss"].shape == (3, q + 1)
    f = tab.feature_cdf("loss", loss, labels)
    fast = step(tab).tau(loss, er, labels=labels)
    np.testing.assert_allclose(fast, step(tab).tau(loss, er, labels=labels, precise=True), atol=1e-5)
    for c in range(3):
        mine = labels == c
        assert np.abs(f[mine] - exact_cdf(loss[mine])).max() <= 1.0 / q + 1e-9
    # The global cdf drops the hard class wholesale: its crops all sit in the top third.
    glob = build_tables(loss, er, w, quantiles=q, angles=8, bins=16).feature_cdf("loss", loss)
    assert glob[labels == 2].min() > 0.6
    with pytest.raises(StoreError, match="labels"):
        tab.feature_cdf("loss", loss)
    # The torch twin (online training) takes the labels too.
    s = step(tab, 0.6, -0.8)
    online = s.tau_torch(torch.from_numpy(loss), torch.from_numpy(er), labels=torch.from_numpy(labels))
    np.testing.assert_allclose(online.numpy(), s.tau(loss, er, labels=labels, precise=True), atol=1e-6)


def test_a_null_of_the_dynamics_ranks_as_the_noisiest():
    """An image the run never trained on has null statistics: at the noisy end of each feature
    (high loss, low margin), with the knots over the images that have a value."""
    rng = np.random.default_rng(1)
    loss_mean = rng.gamma(1.0, 1.0, 400)
    margin = rng.normal(0, 1, 400)
    null = np.zeros(400, bool)
    null[::10] = True
    loss_mean[null] = margin[null] = np.nan
    tab = build_tables(loss_mean, margin, np.ones(400), pair=DYNAMICS_PAIR, quantiles=32, angles=8)
    assert np.isfinite(tab.cdf_knots["loss_mean"]).all() and np.isfinite(tab.cdf_knots["margin_mean"]).all()
    assert (tab.feature_cdf("loss_mean", loss_mean)[null] == 1.0).all()
    assert (tab.feature_cdf("margin_mean", margin)[null] == 0.0).all()
    np.testing.assert_allclose(tab.feature_cdf("loss_mean", loss_mean)[~null], exact_cdf(loss_mean[~null]),
                               atol=1 / 32)
    keep_clean = step(tab, 1.0, 0.0, cut=0.8)  # keeps the low mean loss
    assert (keep_clean.tau(loss_mean, margin, precise=True)[null] == 0).all()
    assert (keep_clean.tau(loss_mean.astype(np.float32), margin.astype(np.float32))[null] == 0).all()
    with pytest.raises(StoreError, match="loss_mean: no value"):
        build_tables(np.full(3, np.nan), np.ones(3), np.ones(3), pair=DYNAMICS_PAIR)
    with pytest.raises(StoreError, match="loss: 1 non-finite"):  # a per-crop feature has no null
        build_tables([np.nan, 1.0], [1.0, 2.0], [1.0, 1.0])


@pytest.fixture(scope="module")
def dyn_store(tmp_path_factory):
    """Digits with a short w_share (it records its training dynamics), features (2 crops per
    image) and tables for the (loss_mean, margin_mean) pair."""
    torch.set_num_threads(1)
    store = tmp_path_factory.mktemp("pair") / "store"
    swift_sampler.ingest("digits", store, noise="symmetric:0.4", val_frac=0.2, test_frac=0.2,
                         shard_size=400, progress=False)
    ckpt = swift_sampler.train_model(store, "w_share", epochs=2, workers=0, progress=False)["checkpoint"]
    summary = swift_sampler.build_features(store, ckpt, crops_per_image=2, progress=False, device="cpu",
                                           features_pair="loss_mean,margin_mean", quantiles=64, angles=16)
    assert summary["tables"]["features"] == ["loss_mean", "margin_mean"]
    return store, ckpt


def test_a_dynamics_pair_sampler_round_trips_through_its_file_and_trains(dyn_store, tmp_path):
    store, _ = dyn_store
    tables = load_tables(store)
    assert tables.pair == DYNAMICS_PAIR
    meta = json.loads(StoreLayout(store).tables_meta.read_text())
    assert (meta["features"], meta["cdf_by"]) == (["loss_mean", "margin_mean"], "global")
    sampler = step(tables, 0.6, -0.8)
    path = tmp_path / "pair.json"
    save_sampler(path, sampler, {"store_id": read_manifest(StoreLayout(store))["store_id"]})
    doc = json.loads(path.read_text())
    assert (doc["features"], doc["cdf_by"]) == (["loss_mean", "margin_mean"], "global")
    loaded, _ = load_sampler(path)
    cols = read_pair_columns(store, loaded.pair, ("index",))
    # Each crop carries its image's value: both crops of an image agree.
    order = np.argsort(cols["index"], kind="stable")
    assert np.array_equal(cols["loss_mean"][order][0::2], cols["loss_mean"][order][1::2], equal_nan=True)
    np.testing.assert_array_equal(loaded.tau_columns(cols), sampler.tau_columns(cols))
    assert 0 < (loaded.tau_columns(cols) == 0).mean() < 1
    check_not_all_zero(loaded, store)
    weights = swift_sampler.sampler_weights(path, store).weights
    assert 0 < (weights == 0).mean() < 1
    stage = swift_sampler.keep_by_tau(path, store, batch=8)
    assert len(stage.tau) == weights.size
    run = swift_sampler.train_model(store, "with-pair", sampler=path, epochs=1, workers=0,
                                    progress=False, features="store")
    assert run["kept_fraction"] is not None and 0 < run["kept_fraction"] <= 1
    # Fresh crops scored online have no training dynamics: refused, naming the features.
    from swift_sampler.train.sampling import create_sampler_hook

    with pytest.raises(UsageError, match="'loss_mean', 'margin_mean'.*online"):
        create_sampler_hook(store, loaded, features="online", scorer=torch.nn.Identity(),
                            batch_size=8, device=torch.device("cpu"))


def test_a_file_naming_a_feature_the_store_lacks_is_refused_by_name(dyn_store, scored_digits, tmp_path, capsys):
    store, _ = dyn_store
    path = tmp_path / "pair.json"
    save_sampler(path, step(load_tables(store)))
    plain = tmp_path / "plain"
    shutil.copytree(scored_digits, plain)  # features, no training dynamics
    sampler, _ = load_sampler(path)
    for use in (lambda: check_not_all_zero(sampler, plain), lambda: swift_sampler.sampler_weights(path, plain)):
        with pytest.raises(StoreError, match="'loss_mean', a training-dynamics statistic.*build-features"):
            use()
    assert run_cli("train", "--store", plain, "--name", "x", "--sampler", path, "--epochs", 1,
                   "--allow-foreign-tables", "--workers", 0) == 2
    assert "'loss_mean'" in capsys.readouterr().err


def test_cdf_by_class_through_the_command_line_and_the_search(dyn_store, tmp_path, capsys):
    store, ckpt = dyn_store
    work = tmp_path / "store"
    shutil.copytree(store, work)
    assert run_cli("pipeline", "build-features", "--store", work, "--checkpoint", ckpt, "--crops-per-image", 2,
                   "--features-pair", "margin_mean,loss", "--cdf-by", "class", "--quantiles", 64,
                   "--angles", 16, "--json") == 0
    tables = load_tables(work)
    assert tables.pair == FeaturePair(("margin_mean", "loss"), "class")
    cols = read_pair_columns(work, tables.pair, ("index",))
    for name in tables.pair.features:
        f = tables.feature_cdf(name, cols[name], cols["label"])
        for c in np.unique(cols["label"]):
            mine = (cols["label"] == c) & ~np.isnan(cols[name])  # a null ranks apart (noisiest)
            assert np.abs(f[mine] - exact_cdf(cols[name][mine])).max() <= 1 / 64 + 1e-9, (name, c)
    capsys.readouterr()
    args = ["search", "run", "--store", work, "--checkpoint", ckpt, "--name", "s", "--steps", 1,
            "--no-guard", "--guard-repeats", 0, "--no-confirm", "--finetune-epochs", 1, "--workers", 0, "--json"]
    assert run_cli(*args) == 0
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_sampler"]
    settings = json.loads((StoreLayout(work).search("s") / "search.json").read_text())
    assert settings["feature_pair"] == {"features": ["margin_mean", "loss"], "cdf_by": "class"}
    assert load_sampler(best)[0].pair == tables.pair
    # Tables rebuilt for another pair: resuming the search is refused, naming the pair.
    build_store_tables(work, quantiles=64, angles=16)
    assert run_cli(*args[:9], 2, *args[10:]) == 2
    assert "feature_pair.features: stored ['margin_mean', 'loss'], now ['loss', 'entropy_r']" in capsys.readouterr().err
    assert run_cli("search", "run", "--store", store, "--checkpoint", ckpt, "--name", "o", "--features", "online",
                   "--steps", 1, "--no-guard", "--no-confirm", "--workers", 0) == 2
    assert "online" in capsys.readouterr().err
    assert not StoreLayout(store).search("o").exists()


def test_files_and_tables_written_before_pairs_mean_the_papers(scored_digits, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(scored_digits, work)
    meta_path = StoreLayout(work).tables_meta
    meta = json.loads(meta_path.read_text())
    assert (meta["features"], meta["cdf_by"]) == (["loss", "entropy_r"], "global")
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("features", "cdf_by")}))
    tables = load_tables(work)
    assert tables.pair == DEFAULT_PAIR
    sampler = step(tables, 0.3, 0.7)
    doc = sampler_to_dict(sampler)
    del doc["cdf_by"]
    doc["version"] = 1
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    loaded, _ = load_sampler(path)
    assert loaded.pair == DEFAULT_PAIR
    cols = read_pair_columns(work, DEFAULT_PAIR)
    np.testing.assert_array_equal(loaded.tau(cols["loss"], cols["entropy_r"]),
                                  sampler.tau(cols["loss"], cols["entropy_r"]))
