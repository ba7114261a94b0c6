"""The inner loop on a real digits store: input checks, determinism, divergence, end to end."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from swift_sampler.pipeline.sampler.file import check_provenance, load_sampler
from swift_sampler.pipeline.sampler.function import Sampler, uniform_sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.search.loop import GuardSettings, read_trials, run_search
from swift_sampler.search.objective import (
    InnerLoopObjective,
    InnerLoopSettings,
    check_search_inputs,
)
from swift_sampler.storage import StoreError, StoreLayout, sha256_file
from swift_sampler.storage.errors import UsageError
from swift_sampler.train.checkpoint import CheckpointError, save_checkpoint
from swift_sampler.train.models import create_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Digits (40% noise) with a short w_share and its features and tables."""
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import fit

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("search-digits") / "store"
    ingest("digits", root, val_frac=0.2, test_frac=0.2, noise="symmetric:0.4", seed=0,
           shard_size=400, progress=False)
    result = fit(resolve_config(root, preset="digits", name="w_share", epochs=3, workers=0,
                                progress=False))
    ckpt = StoreLayout(root).run("w_share") / "checkpoint.pt"
    build_features(root, result.model, crops_per_image=4, checkpoint_sha256=sha256_file(ckpt),
                   quantiles=64, angles=16, progress=False, device="cpu")
    return root


def ckpt_of(store):
    return StoreLayout(store).run("w_share") / "checkpoint.pt"


def test_checkpoint_and_store_mismatches_are_refused(store, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(store, bare, ignore=shutil.ignore_patterns("features", "features.json", "tables"))
    with pytest.raises(StoreError, match="no features"):
        check_search_inputs(bare, ckpt_of(store))
    other = tmp_path / "other.pt"
    save_checkpoint(other, create_model("digits-net", 5, 1, 8))
    with pytest.raises(CheckpointError, match="5 classes x 1 channels but the store has 10 classes"):
        check_search_inputs(store, other)
    torch.manual_seed(1)
    save_checkpoint(other, create_model("digits-net", 10, 1, 8))
    with pytest.raises(StoreError, match="features were built from checkpoint sha256"):
        check_search_inputs(store, other)
    info = check_search_inputs(store, ckpt_of(store))
    assert info["features_checkpoint_sha256"] == sha256_file(ckpt_of(store))


def test_same_seed_same_score_and_recipe_from_the_checkpoint(store):
    objective = InnerLoopObjective(store, ckpt_of(store), InnerLoopSettings(epochs=1), workers=0)
    recipe = objective.describe()
    assert recipe["model"] == "digits-net" and recipe["batch_size"] == 32
    assert recipe["lr"] == pytest.approx(0.1)  # lr_fraction (1.0) x the digits preset's lr
    sampler = uniform_sampler(load_tables(store))
    a, b = objective(sampler, 5), objective(sampler, 5)
    assert a.score == b.score and 0 < a.score <= 1 and a.epochs == 1
    assert 0 < a.extra["true_top1"] <= 1  # diagnostics only


def test_diverged_and_empty_samplers_fail_without_stopping_the_search(store, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(store, work)
    tables = load_tables(work)
    objective = InnerLoopObjective(work, ckpt_of(work), InnerLoopSettings(epochs=1, lr=1e12), workers=0)
    result = objective(uniform_sampler(tables), 0)
    assert math.isnan(result.score) and "loss became" in result.error
    empty = Sampler((0, 0.25, 0.5, 0.75, 1), (0, 0, 0, 0, 0), 0.3, 0.2, "cgf", tables)
    result = objective(empty, 0)
    assert math.isnan(result.score) and result.epochs == 0 and "tau is 0" in result.error
    summary = run_search(work, "nan", objective, lambda z: Sampler.from_point(z, tables, "cgf"),
                         settings={}, steps=2, agent="random", seed=0,
                         initial_points=(uniform_sampler(tables).to_point(),) * 2,
                         guard=GuardSettings(enabled=False, repeats=0))
    rows = read_trials(StoreLayout(work).search("nan") / "trials.parquet")
    assert [r["status"] for r in rows] == ["failed", "failed"] and summary["failed"] == 2
    assert [r["score"] for r in rows] == [0.0, 0.0] and summary["best_sampler"] is None


def run_cli(*argv):
    from swift_sampler.cli import main

    return main([str(a) for a in argv])


def test_search_run_end_to_end_writes_a_valid_sampler(store, tmp_path, capsys):
    work = tmp_path / "store"
    shutil.copytree(store, work)
    args = ["search", "run", "--store", work, "--checkpoint", ckpt_of(work), "--name", "e2e",
            "--steps", 3, "--guard-repeats", 2, "--finetune-epochs", 1, "--workers", 0]
    assert run_cli(*args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    # 3 search trials, uniform on 2 more seeds, the early guard's uniform and 2 best candidates
    # on those 2 seeds.
    assert summary["trials"] == 11 and summary["search_trials"] == 3
    assert out[0].split()[:3] == ["trial", "score", "best"]
    assert summary["choice"] in ("guard", "uniform") and summary["guard"]["seeds"] == [1, 2]
    # The full-run check ran on the guard's winner, or there was nothing to check.
    assert (summary["confirm"] is None) == (summary["guard"]["winner"] is None)
    assert summary["model"] is not None
    sampler, prov = load_sampler(summary["best_sampler"])
    check_provenance(prov, work)
    rows = read_trials(summary["trials_path"])
    assert prov["trial"] == summary["best_trial"] and prov["score"] == rows[prov["trial"]]["score"]
    np.testing.assert_allclose(rows[0]["point"], uniform_sampler().to_point())
    assert all(0 < r["kept_fraction"] <= 1 for r in rows)

    assert run_cli("search", "show", "--store", work, "e2e") == 0
    shown = capsys.readouterr().out.strip().splitlines()
    # header, 11 trials, the legend, the recommendation (and its full-run check), the JSON line
    assert shown[13].startswith("recommended: ") and json.loads(shown[-1])["trials"] == 11
    assert len(shown) == 1 + 11 + 1 + (2 if summary["confirm"] else 1) + 1

    # Same command again: nothing to do. Other settings: refused, naming them.
    assert run_cli(*args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trials"] == 11
    assert run_cli(*args[:-4], "--finetune-epochs", 2, "--workers", 0) == 2
    assert "finetune.epochs: stored 1, now 2" in capsys.readouterr().err


def test_resuming_with_other_workers_or_ranks_is_refused_naming_them(store, tmp_path, capsys):
    """Loader workers and ranks change every trial's data order, hence its score."""
    work = tmp_path / "store"
    shutil.copytree(store, work)
    args = ["search", "run", "--store", work, "--checkpoint", ckpt_of(work), "--name", "w",
            "--no-guard", "--guard-repeats", 0, "--no-confirm", "--finetune-epochs", 1, "--json"]
    assert run_cli(*args, "--steps", 1, "--workers", 0) == 0
    path = StoreLayout(work).search("w") / "search.json"
    settings = json.loads(path.read_text())
    assert (settings["workers"], settings["world_size"]) == (0, 1)
    capsys.readouterr()
    assert run_cli(*args, "--steps", 2, "--workers", 1) == 2
    assert "workers: stored 0, now 1" in capsys.readouterr().err
    path.write_text(json.dumps({**settings, "world_size": 2}))  # as torchrun with 2 ranks records
    assert run_cli(*args, "--steps", 2, "--workers", 0) == 2
    assert "world_size: stored 2, now 1" in capsys.readouterr().err
    assert len(read_trials(StoreLayout(work).search("w") / "trials.parquet")) == 1


def test_search_run_refuses_a_foreign_checkpoint(store, tmp_path, capsys):
    torch.manual_seed(2)
    other = tmp_path / "other.pt"
    save_checkpoint(other, create_model("digits-net", 10, 1, 8))
    assert run_cli("search", "run", "--store", store, "--checkpoint", other, "--name", "x",
                   "--steps", 1) == 2
    assert "features were built from checkpoint" in capsys.readouterr().err
    assert not StoreLayout(store).search("x").exists()


@pytest.mark.slow
def test_real_search_resumes_to_the_same_trials(store, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(store, work)
    tables = load_tables(work)
    objective = InnerLoopObjective(work, ckpt_of(work), InnerLoopSettings(epochs=1), workers=0)
    calls = []

    def flaky(sampler, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return objective(sampler, seed)

    def run(name, fn):
        return run_search(work, name, fn, lambda z: Sampler.from_point(z, tables, "cgf"), settings={},
                          steps=4, agent="gp-ucb", seed=1, trial_seeds="distinct",
                          initial_points=(uniform_sampler(tables).to_point(),))

    run("straight", objective)
    with pytest.raises(KeyboardInterrupt):
        run("resumed", flaky)
    run("resumed", objective)

    def rows(name):
        return [{k: v for k, v in r.items() if k != "seconds"}
                for r in read_trials(StoreLayout(work).search(name) / "trials.parquet")]

    assert rows("resumed") == rows("straight")


# -- the inner-loop variants of the study (bench/bench_inner_loop.py) --------------------------
def test_trainer_keeps_the_last_epochs_checkpoints(store):
    run = StoreLayout(store).run("w_share")
    # w_share ran 3 epochs: the checkpoints after epochs 1 and 2 are kept beside checkpoint.pt.
    assert sorted(p.name for p in run.glob("checkpoint-e*.pt")) == ["checkpoint-e001.pt", "checkpoint-e002.pt"]


def test_continuing_from_a_kept_checkpoint_equals_the_uninterrupted_run(store):
    from swift_sampler.train.checkpoint import load_checkpoint
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import fit

    run = StoreLayout(store).run("w_share")
    config = json.loads((run / "config.json").read_text())
    result = fit(resolve_config(store, preset="digits", name=None, epochs=config["epochs"], workers=0,
                                continue_from=str(run / "checkpoint-e002.pt"), progress=False))
    final = load_checkpoint(run / "checkpoint.pt")["model"]
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(v.cpu(), final[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start", ["early", "scratch"])
def test_early_and_scratch_starts_are_deterministic_and_score_prob(store, start):
    settings = InnerLoopSettings(epochs=1, start=start, score="prob")
    objective = InnerLoopObjective(store, ckpt_of(store), settings, workers=0, device="cpu")
    assert objective.describe()["start"] == start
    sampler = uniform_sampler(load_tables(store), "cgf")
    a, b = objective(sampler, 0), objective(sampler, 0)
    assert a.score == b.score and 0 < a.score < 1 and a.epochs == 1
    top1 = InnerLoopObjective(store, ckpt_of(store), InnerLoopSettings(epochs=1, start=start),
                             workers=0, device="cpu")(sampler, 0)
    assert top1.score != a.score  # a probability, not the top-1 of the same model


def test_early_start_without_the_kept_checkpoint_says_what_to_do(store, tmp_path):
    bare = tmp_path / "store"
    shutil.copytree(store, bare, ignore=shutil.ignore_patterns("checkpoint-e*.pt"))
    with pytest.raises(StoreError, match="early-checkpoint inner loop needs w_share's checkpoint"):
        InnerLoopObjective(bare, ckpt_of(bare), InnerLoopSettings(epochs=1, start="early"), workers=0)


def test_image_features_and_the_keep_rule_are_part_of_the_recipe(store):
    from swift_sampler.train.sampling import ImageTauCrops, StoredCrops, tau_filter, tau_filter_es

    sampler = uniform_sampler(load_tables(store))
    image = InnerLoopObjective(store, ckpt_of(store), InnerLoopSettings(epochs=1, features="image"),
                              workers=0, device="cpu")
    assert image.describe()["features"] == "image" and image.describe()["selection"] == "systematic"
    hook = image.hook(sampler, 0)
    assert isinstance(hook.crop_stage, ImageTauCrops) and hook.batch_filter is tau_filter
    a, b = image(sampler, 3), image(sampler, 3)
    assert a.score == b.score and 0 < a.score <= 1 and a.kept_fraction == pytest.approx(0.5)
    es = InnerLoopObjective(store, ckpt_of(store), InnerLoopSettings(epochs=1, selection="es", features="store"),
                           workers=0)
    # a search recorded before the rule was a setting has no field, and that meant es
    assert "selection" not in es.describe()
    hook = es.hook(sampler, 0)
    assert isinstance(hook.crop_stage, StoredCrops) and hook.batch_filter is tau_filter_es
    with pytest.raises(UsageError, match="selection"):
        InnerLoopSettings(selection="nearest").check()


def test_search_run_with_an_early_guard_compares_by_resuming_w_shares_run(store, tmp_path, capsys):
    work = tmp_path / "store"
    shutil.copytree(store, work)
    args = ["search", "run", "--store", work, "--checkpoint", ckpt_of(work), "--name", "early-guard",
            "--steps", 3, "--guard-repeats", 2, "--guard-candidates", 1, "--finetune-epochs", 1,
            "--no-confirm", "--workers", 0]
    assert run_cli(*args) == 0  # the early guard is the default
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_trials(summary["trials_path"])
    phases = [r["phase"] for r in rows]
    assert phases == ["search"] + ["noise"] * 2 + ["search"] * 2 + ["guard-early"] * 4
    assert summary["guard"]["phase"] == "guard-early" and summary["guard"]["seeds"] == [1, 2]
    settings = json.loads((StoreLayout(work).search("early-guard") / "search.json").read_text())
    assert settings["guard"]["inner_loop"] == "early"
    assert settings["guard_finetune"]["start"] == "early" and settings["finetune"]["start"] == "scratch"
    # The guard's uniform evaluations resume w_share's run: same seed, same score as the
    # early objective gives.
    early = InnerLoopObjective(work, ckpt_of(work), InnerLoopSettings(epochs=1, start="early"), workers=0)
    uniform = uniform_sampler(load_tables(work))
    first = next(r for r in rows if r["phase"] == "guard-early")
    np.testing.assert_allclose(first["point"], uniform.to_point())
    assert first["score"] == early(uniform, first["seed"]).score
    # A w_share without the checkpoint the early guard needs is refused before any trial runs.
    bare = tmp_path / "bare"
    shutil.copytree(store, bare, ignore=shutil.ignore_patterns("checkpoint-e*.pt"))
    bare_args = [str(a).replace(str(work), str(bare)) for a in args]
    assert run_cli(*bare_args) != 0
    err = capsys.readouterr().err
    assert "early-checkpoint inner loop" in err and "--guard-inner-loop" in err
    assert not (StoreLayout(bare).search("early-guard") / "trials.parquet").exists()
