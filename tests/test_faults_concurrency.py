"""Two commands on the same target at once: the second refuses with a clear message (a lock),
and what the first writes is whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from faultlib import (
    Running,
    assert_user_error,
    base_store,
    check_features,
    check_store,
    copy_store,
    ingest_args,
    main_in_process,
    make_checkpoint,
)

from swift_sampler.storage import StoreLayout, exclusive_lock

K = 4
FEATURE_OPTS = ("--crops-per-image", str(K), "--quantiles", "32", "--angles", "8", "--seed", "1",
                "--batch-size", "64", "--no-progress", "--json")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return base_store(tmp_path_factory)


def _refused(code: int, err: str) -> None:
    assert code == 2, err
    assert "in use by another process" in err and "Traceback" not in err, err


def test_second_build_features_is_refused_while_one_holds_the_store(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    parts_before = StoreLayout(store).feature_parts()
    # This process plays the first run: it holds the stage's lock as build-features does.
    with exclusive_lock(StoreLayout(store).lock("features"), "build-features"):
        code, err = main_in_process("pipeline", "build-features", "--store", store, "--checkpoint", ckpt,
                                    *FEATURE_OPTS)
    _refused(code, err)
    assert "build-features" in err and "lock" in err
    assert StoreLayout(store).feature_parts() == parts_before


def test_second_ingest_is_refused_while_one_runs(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with exclusive_lock(StoreLayout(store).lock("ingest"), f"store {StoreLayout(store).root}"):
        _refused(*main_in_process(*ingest_args(store)))
    assert sorted(p.name for p in store.iterdir()) == [".lock-ingest"]


def test_second_training_of_the_same_run_is_refused(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    with exclusive_lock(StoreLayout(store).lock("run-r"), "run r"):
        _refused(*main_in_process("train", "--store", store, "--name", "r", "--preset", "digits",
                                  "--epochs", "1", "--workers", "0", "--resume"))
    assert not (StoreLayout(store).run("r") / "checkpoint.pt").exists()


def test_second_search_of_the_same_name_is_refused(base, tmp_path):
    from faultlib import run_in_process

    store = copy_store(base, tmp_path / "store")
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    assert run_in_process("pipeline", "build-features", "--store", store, "--checkpoint", ckpt,
                          *FEATURE_OPTS) == 0
    folder = StoreLayout(store).search("s")
    with exclusive_lock(folder / ".lock", "search 's'"):
        code, err = main_in_process("search", "run", "--store", store, "--checkpoint", ckpt, "--name", "s",
                                    "--start", "final", "--guard-inner-loop", "search", "--no-confirm",
                                    "--steps", "1", "--finetune-epochs", "1", "--workers", "0")
    _refused(code, err)
    assert not (folder / "trials.parquet").exists()


def test_the_default_early_guard_refuses_a_w_share_without_a_training_run(base, tmp_path):
    """The guard resumes w_share's own run: a checkpoint that records none is refused before
    any trial, saying how to go on."""
    from faultlib import run_in_process

    store = copy_store(base, tmp_path / "store")
    ckpt = make_checkpoint(store, tmp_path / "w.pt")  # weights only, no recipe
    assert run_in_process("pipeline", "build-features", "--store", store, "--checkpoint", ckpt,
                          *FEATURE_OPTS) == 0
    code, err = main_in_process("search", "run", "--store", store, "--checkpoint", ckpt, "--name", "s",
                                "--start", "final", "--no-confirm",
                                "--steps", "1", "--finetune-epochs", "1", "--workers", "0")
    assert code == 2 and "records none" in err and "--guard-inner-loop" in err, err
    assert not (StoreLayout(store).search("s") / "trials.parquet").exists()


@pytest.mark.slow
def test_two_build_features_at_once_one_wins_and_the_result_is_whole(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    cmd = ("pipeline", "build-features", "--store", store, "--checkpoint", ckpt, *FEATURE_OPTS)
    with Running(*cmd) as a, Running(*cmd) as b:
        results = [a.wait(), b.wait()]
    codes = sorted(r.returncode for r in results)
    # Either they overlapped (one refused by the lock) or ran one after the other (both fine).
    assert codes in ([0, 0], [0, 2]), [r.describe() for r in results]
    for r in results:
        if r.returncode == 2:
            assert_user_error(r, "in use by another process")
    check_features(store, K)


@pytest.mark.slow
def test_two_ingests_into_one_folder_at_once(base, tmp_path):
    store = tmp_path / "store"
    with Running(*ingest_args(store)) as a, Running(*ingest_args(store)) as b:
        results = [a.wait(), b.wait()]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.describe() for r in results]
    loser = next(r for r in results if r.returncode == 2)
    # Overlapping: the lock; one after the other: the store already holds data.
    assert "in use by another process" in loser.stderr or "already holds data" in loser.stderr, \
        loser.describe()
    assert "Traceback" not in loser.stderr
    check_store(store)
