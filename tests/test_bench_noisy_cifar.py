"""The noisy-CIFAR benchmark: its pieces against obvious references, and a tiny run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from benchlib.config import (
    METHODS,
    BenchConfig,
    parse_methods,
    planned_work,
    resolve_bench,
)
from benchlib.methods import small_loss_weights
from benchlib.report import gap_share, paired_gap_share, spread
from benchlib.ss import rank_agreement
from benchlib.weights import ImageWeights, SubsetCrops
from swift_sampler.cli import main
from swift_sampler.search.confirm import keeps_sampler

# ----------------------------------------------------------------------------- pieces


def _weighted_batch(weights, index: list[int], size: int) -> dict:
    """Candidates for ``index`` through ``ImageWeights`` and the loader's collate, then the
    sampler stage's filter keeping ``size``."""
    from swift_sampler.train.loader import collate
    from swift_sampler.train.sampling import tau_filter

    samples = [{"index": i, "label": i % 3, "image": torch.full((3, 8, 8), i, dtype=torch.uint8)}
               for i in index]
    rng = np.random.default_rng(len(index))
    crops = list(ImageWeights(weights)(iter(samples), rng=rng, candidates=2, augment=False))
    return tau_filter(collate(crops), rng=rng, size=size)


def test_image_weights_keep_rows_aligned_and_never_zero_weight():
    weights = np.array([0.0, 1.0, 2.0, 0.0, 1.0, 1.0, 3.0, 0.5])
    for _ in range(30):
        out = _weighted_batch(weights, list(range(8)), 8)
        kept = out["index"].numpy()
        assert len(kept) == 8 and out["candidates"] == 16
        assert not np.isin(kept, [0, 3]).any()
        # every column still describes the same rows: label, pixels and tau follow the index
        assert torch.equal(out["label"], out["index"] % 3)
        assert torch.equal(out["image"][:, 0, 0, 0].long(), out["index"])
        assert np.allclose(out["tau"].numpy(), weights[kept])


def test_image_weights_keep_in_proportion_to_weight():
    # Keep 1 of the 4 candidates (2 per image): image 1 with probability 3/4.
    from swift_sampler.train.loader import collate
    from swift_sampler.train.sampling import tau_filter

    samples = [{"index": i, "label": 0, "image": torch.zeros(3, 8, 8, dtype=torch.uint8)} for i in (0, 1)]
    batch = collate(list(ImageWeights(np.array([1.0, 3.0]))(iter(samples), rng=np.random.default_rng(0),
                                                candidates=2, augment=False)))
    rng = np.random.default_rng(1)
    draws = np.array([tau_filter(batch, rng=rng, size=1)["index"].item() for _ in range(4000)])
    assert abs(draws.mean() - 0.75) < 0.03  # 0.75 +- 4.4 sigma


def test_image_weights_refuse_all_zero_and_negative():
    with pytest.raises(ValueError, match="zero for every image"):
        ImageWeights(np.zeros(4))
    with pytest.raises(ValueError, match=">= 0"):
        ImageWeights(np.array([1.0, -1.0]))


def test_subset_crops_passes_only_the_subset():
    keep = np.array([True, False, True, False])
    samples = [{"index": i, "label": 0, "image": torch.zeros(3, 8, 8, dtype=torch.uint8)} for i in range(4)] * 2
    out = list(SubsetCrops(keep)(iter(samples), rng=np.random.default_rng(0), candidates=1, augment=True))
    assert [s["index"] for s in out] == [0, 2, 0, 2]


def test_small_loss_weights_drop_the_highest_losses():
    loss = np.array([0.1, 5.0, 0.3, 2.0, 2.0, 0.2, 9.0, 0.0, 1.0, 3.0])
    w = small_loss_weights(loss, 0.4)
    assert w.sum() == 6
    threshold = np.sort(loss)[-4]
    assert np.all(loss[w == 0] >= threshold) and np.all(loss[w == 1] <= threshold)
    assert small_loss_weights(loss, 0.0).sum() == 10


def test_rank_agreement_matches_a_slow_reference():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.normal(size=7), rng.normal(size=7)
        ra, rb = rankdata(a), rankdata(b)
        rho = np.corrcoef(ra, rb)[0, 1]  # Spearman = Pearson of the ranks
        got = rank_agreement(a, b)
        assert math.isclose(got["sr"], rho, abs_tol=1e-12)
        order = sorted(range(7), key=lambda i: -b[i])
        assert got["tr"] == order.index(int(np.argmax(a))) + 1
    assert rank_agreement([1, 2, 3], [3, 2, 1]) == {"sr": -1.0, "tr": 3}
    assert rank_agreement([1, 1], [0.2, 0.3])["sr"] is None


def test_gap_share_and_spread():
    assert gap_share(0.74, 0.70, 0.78) == pytest.approx(0.5)
    assert gap_share(0.7, 0.7, 0.7) is None and gap_share(None, 0.7, 0.8) is None
    # Seed 1 lacks the reference: the share is taken on seed 0 alone, where all three ran.
    runs = {0: {"m": {"test_top1": 0.74}, "u": {"test_top1": 0.70}, "o": {"test_top1": 0.78}},
            1: {"m": {"test_top1": 0.90}, "u": {"test_top1": 0.60}}}
    assert paired_gap_share(runs, "m", "u", "o") == pytest.approx(0.5)
    assert paired_gap_share({1: runs[1]}, "m", "u", "o") is None
    s = spread([0.70, 0.72, None, float("nan")])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.71) and s["std"] == pytest.approx(np.std([0.7, 0.72], ddof=1))
    assert spread([0.5])["std"] is None


def test_settings_are_checked(tmp_path):
    assert parse_methods("ss,uniform") == ("uniform", "ss")
    assert parse_methods("all") == METHODS
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("uniform,mixup")
    with pytest.raises(ValueError, match="verify-ranks"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", verify_ranks=1)
    with pytest.raises(ValueError, match="add ss"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", verify_ranks=2, methods="uniform")
    with pytest.raises(ValueError, match="noise"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", noise="gaussian:0.3")


def test_search_settings_name_the_search_and_scale_its_cost(tmp_path):
    one = resolve_bench(tmp_path, tmp_path / "o", preset="cpu-quick", methods="all")
    two = resolve_bench(tmp_path, tmp_path / "o", preset="cpu-quick", methods="all", finetune_repeats=2)
    prefix = f"ss-e3-lr0.5{'-' + one.inner_start if one.inner_start != 'final' else ''}"
    assert one.search_name("ss").startswith(prefix) and one.search_name("ss").endswith("-g2x2-image")
    assert two.search_name("ss-cdf").startswith("ss-cdf-e3-lr0.5-r2")
    stored = resolve_bench(tmp_path, tmp_path / "o", preset="cpu-quick", methods="all",
                           sampler_features="store", guard_inner_loop="search")
    assert stored.search_name("ss").endswith("-g2x2")  # the guard's inner loop is not in the name
    counts = {"train": 1000, "val": 100, "test": 100}
    w1, w2 = planned_work(one, counts), planned_work(two, counts)
    # search, noise and the early guard's trials (uniform and 2 candidates on the 2 noise
    # seeds): 10 + 2 + 3 x 2 = 18 trials of 3 epochs; the search's own guard reuses the noise
    # trials for uniform: 2 fewer.
    trials = one.steps + one.guard_repeats + (one.guard_candidates + 1) * one.guard_repeats
    assert trials == 18
    search = trials * one.finetune_epochs * counts["train"]
    assert w2["ss"]["train"] - w1["ss"]["train"] == search and w2["uniform"] == w1["uniform"]
    saved = one.guard_repeats * one.finetune_epochs * counts["train"]
    assert w1["ss"]["train"] - planned_work(stored, counts)["ss"]["train"] == saved
    # settings stored before a field existed read as what the search did then: finetune_repeats
    # as its default (1), the guard as absent, so a result made without it is not reused.
    older = {k: v for k, v in one.search_settings().items() if k != "finetune_repeats"}
    assert BenchConfig.with_defaults(older) == one.search_settings() != two.search_settings()
    legacy = {k: one.search_settings()[k] for k in ("steps", "finetune_epochs", "finetune_lr_fraction")}
    assert BenchConfig.with_defaults(legacy)["guard"] is False != one.guard
    with pytest.raises(ValueError, match="finetune-repeats"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", finetune_repeats=0)


def test_clean_twin_is_checked(tmp_path):
    from benchlib.stores import check_twins, ground_truth
    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.storage import StoreError

    kw = dict(val_frac=0.2, test_frac=0.2, limit=200, shard_size=100, progress=False)
    ingest("digits", tmp_path / "noisy", noise="symmetric:0.4", seed=0, **kw)
    ingest("digits", tmp_path / "clean", noise="none", seed=0, **kw)
    ingest("digits", tmp_path / "other", noise="none", seed=1, **kw)
    check_twins(tmp_path / "noisy", tmp_path / "clean")
    truth, twin = ground_truth(tmp_path / "noisy"), ground_truth(tmp_path / "clean")
    assert np.array_equal(twin["label"], truth["true_label"]) and truth["noisy"].any()
    with pytest.raises(StoreError, match="not the clean twin"):
        check_twins(tmp_path / "noisy", tmp_path / "other")
    with pytest.raises(StoreError, match="noisy labels"):
        check_twins(tmp_path / "noisy", tmp_path / "noisy")


# ----------------------------------------------------------------------------- end to end


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_benchmark_end_to_end_and_resume(shared_cifar, tmp_path, capsys):
    """300 CIFAR images, 1 epoch, 2 trials per search, 2-fold cleanlab, every method."""
    torch.set_num_threads(1)
    out = tmp_path / "results"
    argv = ["bench", "noisy-cifar", "--data", shared_cifar, "--out", str(out), "--tiny",
            "--methods", "all", "--verify-ranks", "2", "--json"]
    assert main(argv) == 0
    summary = _last_json(capsys.readouterr().out)
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["methods"]) == set(METHODS)
    for m, e in doc["methods"].items():
        assert 0.0 <= e["test_top1"]["mean"] <= 1.0, m
        assert e["seconds"]["mean"] > 0, m
    assert doc["data"]["counts"] == {"train": 180, "val": 60, "test": 60}
    assert doc["methods"]["uniform"]["sampler_gap_recovered"] in (0.0, None)
    assert doc["methods"]["cleanlab"]["per_seed"][0]["folds"] == 2
    # the cost each method reports is the cost the plan (time estimate) predicts
    config = resolve_bench(shared_cifar, out, preset="tiny", methods="all", verify_ranks=2)
    work = planned_work(config, doc["data"]["counts"])
    for m, e in doc["methods"].items():
        # The plan counts the ss methods' retraining, which is skipped when the guard chose
        # the uniform sampler (its full run is w_share).
        skipped = sum(r["run"] == "uniform" for r in e["per_seed"]) if m.startswith("ss") else 0
        if m == "uniform-early":  # the uniform run's own checkpoint: its cost, no work of its own
            assert e["train_runs"] == 1.0 and work[m]["train"] == 0.0
            continue
        assert (e["train_runs"] + skipped) * config.epochs * 180 == pytest.approx(work[m]["train"]), m
    for m in ("ss", "ss-cdf", "ss-random"):
        e = doc["methods"][m]
        # 2 search trials, uniform on 2 more seeds, the early guard's uniform and 1 candidate
        # on those 2: 8 x 1 epoch, 4 runs of 2 epochs
        assert e["search_epochs"] == 8 and e["search_cost_runs"] == pytest.approx(4.0)
        # The full-run check: the user gets the sampler's model only if it beat w_share on val;
        # when the guard chose the uniform sampler there is nothing to check: w_share's result.
        r, uniform = e["per_seed"][0], doc["methods"]["uniform"]["per_seed"][0]
        assert (r["search"]["choice"] == "uniform") == (r["run"] == "uniform") == (r["confirm"] is None)
        if r["confirm"] is None:
            assert (r["test_top1"], r["val_top1"]) == (uniform["test_top1"], uniform["val_top1"])
            continue
        check = r["confirm"]
        assert check["uniform_val_top1"] == uniform["val_top1"]
        # the library's rule: a val gain above one standard error of the paired difference
        assert check["kept"] == keeps_sampler(check["sampler_val_top1"] - uniform["val_top1"],
                                              check["val_gain_se"])
        got = check["sampler_test_top1"] if check["kept"] else uniform["test_top1"]
        assert r["test_top1"] == got and r["val_top1"] >= uniform["val_top1"]
    # The search ran the preset's inner loop, and its search.json says so.
    recorded = json.loads((out / "seed-0" / "noisy" / "searches" / config.search_name("ss")
                           / "search.json").read_text())
    inner = recorded["finetune"]
    assert (inner["start"], inner["epochs"], inner["features"], recorded["trial_seeds"]) == (
        config.inner_start, config.finetune_epochs, config.sampler_features, config.trial_seeds)
    assert recorded["feature_pair"]["features"] == list(config.pair().features)
    v = doc["verify_ranks"]["per_seed"][0]
    assert v["samplers"] == 2 and v["tr"] in (1, 2) and (v["sr"] is None or abs(v["sr"]) <= 1)
    table = (out / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in table or f"| {m} (true rate given) |" in table
    # Fig. 1a, 1b, 2b and 3 and the per-epoch curves, all in the results folder
    assert not doc["figures_missing"] and len(doc["figures"]) == 5
    for fig in doc["figures"]:
        assert (out / fig).is_file() and (out / fig).read_bytes()[:4] == b"\x89PNG"
        assert f"]({fig})" in table
    assert summary["test_top1"] == {m: e["test_top1"]["mean"] for m, e in doc["methods"].items()}

    # Resume: nothing is trained again and the results are the same.
    before = {p: p.read_bytes() for p in (out / "seed-0" / "methods").glob("*.json")}
    assert main(argv) == 0
    assert _last_json(capsys.readouterr().out)["test_top1"] == summary["test_top1"]
    assert {p: p.read_bytes() for p in (out / "seed-0" / "methods").glob("*.json")} == before

    # Report only, naming a seed never run: nothing is trained or ingested, the same numbers.
    assert main([*argv, "--seeds", "2", "--report-only"]) == 0
    assert _last_json(capsys.readouterr().out)["test_top1"] == summary["test_top1"]
    assert not (out / "seed-1").exists()
    assert {p: p.read_bytes() for p in (out / "seed-0" / "methods").glob("*.json")} == before
    assert "| ss | 1 |" in (out / "results.md").read_text()

    # Other search settings re-run the ss methods alone: one more trial extends each search
    # (same folder), the other methods' results are kept byte for byte.
    assert main([*argv, "--steps", "3"]) == 0
    capsys.readouterr()
    after = {p.name: p.read_bytes() for p in (out / "seed-0" / "methods").glob("*.json")}
    for p, data in before.items():
        assert (after[p.name] == data) == (p.stem not in ("ss", "ss-cdf", "ss-random")), p.name
    for m in ("ss", "ss-cdf", "ss-random"):
        result = json.loads(after[f"{m}.json"])
        assert result["search_settings"]["steps"] == 3 and result["search"]["search_trials"] == 3
        assert result["search"]["search"] == config.search_name(m)
        assert result["run"].startswith(config.search_name(m) + "-t") or \
            (result["run"] == "uniform" and result["search"]["choice"] == "uniform")

    # Fewer steps than a search holds would count its cost and its best over different trials.
    assert main([*argv, "--steps", "2"]) == 2
    assert "already holds 3 trials" in capsys.readouterr().err

    # Other data or training settings in the same folder are refused, naming the difference.
    assert main([*argv, "--steps", "3", "--epochs", "3"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_gmm_rule_keeps_the_low_loss_mode_of_a_bimodal_loss():
    from benchlib.methods import gmm_clean_posterior

    rng = np.random.default_rng(0)
    clean = rng.normal(0.3, 0.1, 600).clip(0)   # fitted labels: small loss
    noisy = rng.normal(2.5, 0.4, 400)            # flipped labels: large loss
    loss = np.r_[clean, noisy]
    keep = gmm_clean_posterior(loss, seed=0) > 0.5
    assert keep[:600].mean() > 0.98 and keep[600:].mean() < 0.02
    # No noise rate is given: the estimate comes out of the mixture.
    assert 1 - keep.mean() == pytest.approx(0.4, abs=0.02)
    # Same seed, same decision; an order change does not change any image's decision.
    perm = rng.permutation(loss.size)
    np.testing.assert_array_equal(gmm_clean_posterior(loss[perm], seed=0) > 0.5, keep[perm])


def test_coteaching_exchanges_selections_and_both_networks_take_the_same_steps(shared_cifar, tmp_path):
    import torch

    from benchlib.coteaching import exchange, forget_rate, train_coteaching
    from swift_sampler.pipeline.ingest.build import ingest

    # The exchange: A learns from B's small-loss samples and B from A's.
    loss_a = torch.tensor([0.1, 0.9, 0.5, 0.2])
    loss_b = torch.tensor([0.8, 0.1, 0.3, 0.7])
    for_a, for_b = exchange(loss_a, loss_b, 2)
    assert sorted(for_a.tolist()) == [1, 2] and sorted(for_b.tolist()) == [0, 3]
    assert forget_rate(0.0, rate=0.4, ramp_epochs=3) == 0.0
    assert forget_rate(1.5, rate=0.4, ramp_epochs=3) == pytest.approx(0.2)
    assert forget_rate(9.0, rate=0.4, ramp_epochs=3) == pytest.approx(0.4)

    config = resolve_bench(shared_cifar, tmp_path / "o", preset="tiny", epochs=2)
    store = tmp_path / "store"
    ingest(f"imagefolder:{shared_cifar}", store, val_frac=0.2, test_frac=0.2, limit=300,
           noise="symmetric:0.4", shard_size=100, progress=False)
    sizes = []
    out = train_coteaching(store, config=config, rate=0.4, seed=0, ramp_epochs=1,
                           on_step=lambda a, b: sizes.append((len(a), len(b))))
    steps = 2 * (180 // config.batch_size)
    assert out["steps"] == [steps, steps] and len(sizes) == steps  # one run's steps each
    assert all(a == b for a, b in sizes)
    assert sizes[0][0] == config.batch_size and sizes[-1][0] == round(0.6 * config.batch_size)


def test_benchmark_takes_a_label_file_and_keeps_the_test_split_clean(shared_cifar, tmp_path):
    from benchlib.stores import ground_truth, prepare_stores

    rows = (Path(shared_cifar).parents[1] / "cifar10n" / "random1.csv").read_text().splitlines()
    labels = tmp_path / "random1.csv"
    labels.write_text("\n".join(rows) + "\n")
    config = resolve_bench(shared_cifar, tmp_path / "o", preset="tiny", labels=str(labels))
    assert config.noise == "none" and config.labels == str(labels.resolve())
    with pytest.raises(ValueError, match="drop --noise"):
        resolve_bench(shared_cifar, tmp_path / "o", preset="tiny", labels=str(labels),
                      noise="symmetric:0.4")
    stores = prepare_stores(config, tmp_path / "o" / "seed-0", 0)
    truth = ground_truth(stores["noisy"])
    assert 0.05 < truth["noisy"].mean() < 0.35  # random1 is 17% wrong over all 50,000
    test = ground_truth(stores["noisy"], "test")
    assert not test["noisy"].any()
    assert stores["noise"]["kind"] == "labels"


def test_label_file_from_the_command_line_needs_no_noise_flag(shared_cifar, tmp_path, monkeypatch, capsys):
    # The CLI's --noise has no default of its own: with --labels the store takes the file's
    # labels, without it the preset's 40% symmetric noise; an explicit --noise is refused.
    import benchlib

    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n")
    seen = []

    def fake_run(config, **_):
        seen.append(config)
        table = tmp_path / "results.md"
        table.write_text("")
        return {"table": str(table)}

    monkeypatch.setattr(benchlib, "run_benchmark", fake_run)
    base = ["bench", "noisy-cifar", "--data", shared_cifar, "--tiny", "--out", str(tmp_path / "o")]
    assert main([*base, "--labels", str(labels)]) == 0
    assert main(base) == 0
    assert [c.noise for c in seen] == ["none", "symmetric:0.4"] and seen[0].labels
    assert main([*base, "--labels", str(labels), "--noise", "symmetric:0.2"]) == 2
    assert "drop --noise symmetric:0.2" in capsys.readouterr().err


def test_a_benchmark_stored_without_a_keep_rule_used_es_and_is_not_resumed_with_another(tmp_path):
    from benchlib.runner import _check_settings
    from swift_sampler.storage import StoreError

    now = resolve_bench(tmp_path, tmp_path / "o", preset="tiny")
    assert now.selection == "systematic"
    stored = {k: v for k, v in now.definition().items() if k != "selection"}
    assert BenchConfig.definition_with_defaults(stored)["selection"] == "es"
    assert "selection" not in BenchConfig.with_defaults(now.search_settings())  # not a search key
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(stored))
    with pytest.raises(StoreError, match="selection"):
        _check_settings(path, now, print)
    _check_settings(path, resolve_bench(tmp_path, tmp_path / "o", preset="tiny", selection="es"), print)
    with pytest.raises(ValueError, match="selection"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", selection="nearest")


def test_image_features_name_a_search_of_their_own(tmp_path):
    store = resolve_bench(tmp_path, tmp_path / "o", preset="tiny", sampler_features="store")
    image = resolve_bench(tmp_path, tmp_path / "o", preset="tiny")  # the default
    assert image.search_name("ss") == store.search_name("ss") + "-image"
    assert image.search_settings()["sampler_features"] == "image"
    legacy = {k: v for k, v in store.search_settings().items() if k != "sampler_features"}
    assert BenchConfig.with_defaults(legacy) == store.search_settings()  # stored before: store
    with pytest.raises(ValueError, match="sampler-features"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", sampler_features="online")


def test_a_feature_pair_names_a_search_of_its_own_and_builds_its_tables(shared_cifar, tmp_path):
    from benchlib.runner import run_benchmark
    from swift_sampler.pipeline.sampler.table_store import load_tables

    paper = resolve_bench(tmp_path, tmp_path / "o", preset="tiny")  # the default: the paper's
    dynamics = resolve_bench(tmp_path, tmp_path / "o", preset="tiny", features_pair="loss_mean,loss")
    assert dynamics.search_name("ss") == paper.search_name("ss") + "-loss_mean.loss"
    legacy = {k: v for k, v in paper.search_settings().items() if k != "features_pair"}
    assert BenchConfig.with_defaults(legacy) == paper.search_settings()  # stored before: the paper's
    by_class = resolve_bench(tmp_path, tmp_path / "o", preset="tiny", features_pair="loss_mean,loss:class")
    assert by_class.search_name("ss").endswith("-loss_mean.loss-byclass")
    with pytest.raises(ValueError, match="unknown feature 'margin'"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", features_pair="loss,margin")

    torch.set_num_threads(1)
    out = tmp_path / "run"
    config = resolve_bench(shared_cifar, out, preset="tiny", methods="uniform,ss", steps=2,
                           features_pair="loss_mean,loss", guard=False, progress=False)
    run_benchmark(config, log=lambda m: None)
    store = out / "seed-0" / "noisy"
    search = json.loads((store / "searches" / config.search_name("ss") / "search.json").read_text())
    assert search["feature_pair"] == {"features": ["loss_mean", "loss"], "cdf_by": "global"}
    assert load_tables(store).pair.features == ("loss_mean", "loss")


def test_a_guard_with_its_own_inner_loop_keeps_the_search_and_counts_its_cost(tmp_path):
    search = resolve_bench(tmp_path, tmp_path / "o", preset="cpu-quick", guard_inner_loop="search")
    early = resolve_bench(tmp_path, tmp_path / "o", preset="cpu-quick")  # the default
    # Same search folder: the guard acts after the last search trial and is run again.
    assert early.search_name("ss") == search.search_name("ss")
    assert early.search_settings() != search.search_settings()
    legacy = {k: v for k, v in search.search_settings().items() if k != "guard_inner_loop"}
    assert BenchConfig.with_defaults(legacy)["guard_inner_loop"] == "search"
    counts = {"train": 1000, "val": 100, "test": 100}
    extra = planned_work(early, counts)["ss"]["train"] - planned_work(search, counts)["ss"]["train"]
    # the uniform sampler on the guard's seeds, by the guard's inner loop
    assert extra == search.guard_repeats * search.finetune_epochs * counts["train"]
    with pytest.raises(ValueError, match="inner loop"):
        resolve_bench(tmp_path, tmp_path / "o", preset="tiny", guard_inner_loop="later")


def test_val_and_test_shares_set_the_splits_and_a_store_of_other_shares_is_refused(shared_cifar, tmp_path):
    from benchlib.stores import prepare_stores
    from swift_sampler.storage import StoreError

    config = resolve_bench(shared_cifar, tmp_path / "o", preset="tiny", val_frac=0.4, test_frac=0.1)
    stores = prepare_stores(config, tmp_path / "o" / "seed-0", 0)
    assert stores["counts"] == {"train": 150, "val": 120, "test": 30}  # 300 images, 30 per class
    other = resolve_bench(shared_cifar, tmp_path / "o", preset="tiny", val_frac=0.2, test_frac=0.1)
    with pytest.raises(StoreError, match="another data set"):
        prepare_stores(other, tmp_path / "o" / "seed-0", 0)
    for bad in (dict(val_frac=0.0), dict(test_frac=1.0), dict(val_frac=0.6, test_frac=0.4)):
        with pytest.raises(ValueError, match="frac"):
            resolve_bench(shared_cifar, tmp_path / "o", preset="tiny", **bad)


def test_early_stopped_uniform_is_the_best_val_epoch_of_the_uniform_run(shared_cifar, tmp_path):
    from benchlib.runner import run_benchmark
    from swift_sampler.train.checkpoint import load_model
    from swift_sampler.train.evaluate import evaluate

    torch.set_num_threads(1)
    out = tmp_path / "o"
    config = resolve_bench(shared_cifar, out, preset="tiny", methods="uniform,uniform-early",
                           epochs=3, progress=False)
    run_benchmark(config, log=lambda m: None)
    doc = json.loads((out / "results.json").read_text())
    early = doc["methods"]["uniform-early"]["per_seed"][0]
    curve = doc["curves"]["per_seed"]["0"]["uniform"]
    val = [r["val_accuracy"] for r in curve]
    assert early["best_epoch"] == int(np.argmax(val)) and len(curve) == 3
    run = out / "seed-0" / "noisy" / "runs" / "uniform"
    model, meta = load_model(run / "checkpoint-best.pt")
    assert meta["epoch"] == early["best_epoch"]
    test = evaluate(out / "seed-0" / "noisy", model, "test", workers=0)["top1"]
    assert early["test_top1"] == test
    # the curve's clean-test point of that epoch is the same model's score
    assert curve[early["best_epoch"]]["test_accuracy"] == pytest.approx(test)
    assert "## Per-epoch curves" in (out / "results.md").read_text()
