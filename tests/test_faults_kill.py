"""SIGKILL each long-running command at chosen points, run the same command again, and check
that nothing is lost, nothing is duplicated, and the end result equals an uninterrupted run.

Kill points are polled on the store (the k-th shard, part, trial or metrics line appears), some
followed by a short random delay so that the kill lands in the middle of a write.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faultlib import (
    Running,
    base_store,
    check_features,
    check_store,
    check_trials,
    comparable_trials,
    copy_store,
    digests,
    exists,
    files_at_least,
    ingest_args,
    lines_at_least,
    make_checkpoint,
    parquet_rows_at_least,
    run_cli,
    run_in_process,
    run_ok,
    state_dict_equal,
    temporaries,
)

from swift_sampler.storage import StoreLayout, read_manifest

K = 4  # crops per image: small, so build-features stays quick
FEATURE_OPTS = ("--crops-per-image", str(K), "--quantiles", "64", "--angles", "16", "--seed", "1",
                "--batch-size", "64", "--no-progress", "--json")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return base_store(tmp_path_factory)


def _same_store_content(a: Path, b: Path) -> None:
    """Shards and samples.parquet byte-identical; manifests equal but for id and time."""
    assert digests(a / "shards") == digests(b / "shards")
    assert digests(a, "samples.parquet") == digests(b, "samples.parquet")
    ma, mb = (read_manifest(StoreLayout(x)) for x in (a, b))
    for m in (ma, mb):
        m.pop("store_id")
        m.pop("created")
    assert ma == mb


# -- ingest ------------------------------------------------------------------------------------

def _staged_shards(store: Path, k: int):
    # ingest stages everything in STORE/.tmp-ingest-*/shards before moving it into place.
    return files_at_least(store, "*.tar", k)


@pytest.mark.slow
def test_ingest_killed_after_k_shards_then_rerun_equals_uninterrupted(base, tmp_path):
    store = tmp_path / "store"
    with Running(*ingest_args(store)) as r:
        assert r.kill_when(_staged_shards(store, 5)), "ingest finished before the kill"
    # A killed ingest leaves no manifest, so nothing downstream can mistake it for a store.
    assert not (store / "manifest.json").exists()
    run_ok(*ingest_args(store))
    check_store(store)
    assert temporaries(store) == []
    _same_store_content(store, base)


@pytest.mark.slow
def test_ingest_killed_repeatedly_mid_write_then_rerun_equals_uninterrupted(base, tmp_path):
    store = tmp_path / "store"
    rng = random.Random(7)
    for k in (1, 8, 17):
        with Running(*ingest_args(store)) as r:
            r.kill_when(_staged_shards(store, k), delay=rng.uniform(0, 0.02))
        assert not (store / "manifest.json").exists() or check_store(store)
    result = run_cli(*ingest_args(store))
    if result.returncode != 0:  # the last kill may have landed after the commit
        assert "already holds data" in result.stderr, result.describe()
    check_store(store)
    assert temporaries(store) == []
    _same_store_content(store, base)


def test_ingest_rerun_after_kill_between_commit_and_manifest(base, tmp_path):
    # The state a SIGKILL inside ingest._commit leaves (shards and samples moved into place, the
    # manifest not yet written): simulated, because that window is microseconds wide.
    store = copy_store(base, tmp_path / "store")
    (store / "manifest.json").unlink()
    (store / ".tmp-ingest-0123456789ab").mkdir()
    assert run_in_process(*ingest_args(store)) == 0
    check_store(store)


def test_ingest_refused_after_kill_between_commit_and_cleanup_removes_the_staging(base, tmp_path):
    # The state a SIGKILL after ingest's commit leaves (a complete store and the staging folder
    # not yet removed): the rerun is refused, and clears the dead staging folder on its way out.
    store = copy_store(base, tmp_path / "store")
    (store / ".tmp-ingest-0123456789ab" / "shards").mkdir(parents=True)
    assert run_in_process(*ingest_args(store)) != 0
    check_store(store)
    assert temporaries(store) == []


# -- build-features ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def features_reference(base, tmp_path_factory):
    """A store with its checkpoint and the features of an uninterrupted CLI run."""
    root = tmp_path_factory.mktemp("features-ref")
    store = copy_store(base, root / "store")
    ckpt = make_checkpoint(store, root / "w.pt")
    assert run_in_process(*_features_cmd(store, ckpt)) == 0
    return store, ckpt, check_features(store, K)


def _features_cmd(store: Path, ckpt: Path) -> tuple:
    return ("pipeline", "build-features", "--store", store, "--checkpoint", ckpt, *FEATURE_OPTS)


def _check_features_resumed(store: Path, reference) -> None:
    ref_store, _, ref_rows = reference
    rows = check_features(store, K)
    assert rows.equals(ref_rows), "resumed features differ from an uninterrupted run"
    # Parts and tables are byte-identical to the uninterrupted run's.
    assert digests(store / "features", "part-*") == digests(ref_store / "features", "part-*")
    assert digests(store / "tables") == digests(ref_store / "tables")
    assert temporaries(store) == []


def _store_without_features(ref_store, dst):
    store = copy_store(ref_store, dst)
    for d in ("features", "tables"):
        for p in (store / d).iterdir():
            p.unlink()
    StoreLayout(store).features_meta.unlink(missing_ok=True)
    return store


def test_build_features_killed_after_k_parts_resumes_to_identical_rows(features_reference, tmp_path):
    ref_store, ckpt, _ = features_reference
    store = _store_without_features(ref_store, tmp_path / "store")
    cmd = _features_cmd(store, ckpt)
    with Running(*cmd) as r:
        assert r.kill_when(files_at_least(store / "features", "part-*.parquet", 3)), \
            "build-features finished before the kill"
    parts = StoreLayout(store).feature_parts()
    assert 3 <= len(parts) < 16
    for part in parts:  # every part left behind is whole
        assert pq.read_table(part).num_rows == 20 * K
    assert not StoreLayout(store).features_meta.exists()
    # The rerun in this process (the slow variants below rerun it as a real process too).
    assert run_in_process(*cmd) == 0
    meta = json.loads(StoreLayout(store).features_meta.read_text())
    assert meta["done"] and meta["parts"] == 16
    _check_features_resumed(store, features_reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["first-part", "mid-write", "before-tables"])
def test_build_features_killed_at_various_points_resumes(features_reference, tmp_path, point):
    ref_store, ckpt, _ = features_reference
    store = _store_without_features(ref_store, tmp_path / "store")
    cmd = _features_cmd(store, ckpt)
    rng = random.Random(point)
    rounds = {
        "first-part": [(files_at_least(store / "features", "part-*.parquet", 1), 0.0)],
        # Several kills, each a few ms after a part landed: most hit the next part's write.
        "mid-write": [(files_at_least(store / "features", "part-*.parquet", k), rng.uniform(0, 0.05))
                      for k in (2, 6, 11)],
        # After features.json, while the tables are built.
        "before-tables": [(exists(StoreLayout(store).features_meta), 0.0)],
    }[point]
    for condition, delay in rounds:
        with Running(*cmd) as r:
            r.kill_when(condition, delay=delay)
    run_ok(*cmd)
    _check_features_resumed(store, features_reference)


# -- train -------------------------------------------------------------------------------------

TRAIN_OPTS = ("--preset", "digits", "--epochs", "4", "--workers", "1", "--seed", "5", "--resume",
              "--json")


def _train_cmd(store: Path, name: str) -> tuple:
    return ("train", "--store", store, "--name", name, *TRAIN_OPTS)


@pytest.fixture(scope="module")
def train_reference(base, tmp_path_factory):
    store = copy_store(base, tmp_path_factory.mktemp("train-ref") / "store")
    assert run_in_process(*_train_cmd(store, "ref")) == 0
    return store


def _load(path: Path) -> dict:
    from swift_sampler.train.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, "random"])
def test_train_killed_after_epoch_resumes_to_identical_weights(train_reference, tmp_path, delay):
    store = train_reference
    name = f"killed-{delay}"
    run = StoreLayout(store).run(name)
    cmd = _train_cmd(store, name)
    wait = random.Random(11).uniform(0.05, 0.6) if delay == "random" else 0.0
    with Running(*cmd) as r:
        assert r.kill_when(lines_at_least(run / "metrics.jsonl", 2), delay=wait), \
            "train finished before the kill"
    # What the kill left is usable: a checkpoint that loads, at most one epoch behind the log.
    ckpt = _load(run / "checkpoint.pt")
    logged = len(_metrics(run))
    assert logged - 2 <= ckpt["epoch"] <= logged - 1
    resumed = run_ok(*cmd).summary()
    assert resumed["start_epoch"] == ckpt["epoch"] + 1
    ref = StoreLayout(store).run("ref")
    assert state_dict_equal(_load(run / "checkpoint.pt")["model"],
                            _load(ref / "checkpoint.pt")["model"]) == []
    assert [m["epoch"] for m in _metrics(run)] == [0, 1, 2, 3]
    for a, b in zip(_metrics(run), _metrics(ref)):
        assert a["loss"] == b["loss"] and a["val_accuracy"] == b["val_accuracy"]


# -- search run --------------------------------------------------------------------------------

SEARCH_STEPS = 4


def _search_cmd(store: Path, ckpt: Path, name: str) -> tuple:
    return ("search", "run", "--store", store, "--checkpoint", ckpt, "--name", name,
            "--steps", str(SEARCH_STEPS), "--finetune-epochs", "1", "--agent", "random",
            "--seed", "2", "--workers", "1", "--no-guard", "--guard-repeats", "0", "--no-confirm",
            # make_checkpoint is no training run: no checkpoints of earlier epochs to start from
            "--start", "final", "--json")


@pytest.fixture(scope="module")
def search_reference(features_reference):
    store, ckpt, _ = features_reference
    assert run_in_process(*_search_cmd(store, ckpt, "ref")) == 0
    return store, ckpt, check_trials(store, "ref", SEARCH_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after-trial", "mid-trial"])
def test_search_killed_resumes_with_every_trial_once(search_reference, point):
    store, ckpt, ref_trials = search_reference
    name = f"killed-{point}"
    trials_path = StoreLayout(store).search(name) / "trials.parquet"
    cmd = _search_cmd(store, ckpt, name)
    delay = 0.0 if point == "after-trial" else random.Random(3).uniform(0.2, 1.0)
    with Running(*cmd) as r:
        assert r.kill_when(parquet_rows_at_least(trials_path, 2), delay=delay), \
            "search finished before the kill"
    kept = check_trials(store, name)  # no half trial recorded
    assert 2 <= len(kept) < SEARCH_STEPS
    run_ok(*cmd)
    trials = check_trials(store, name, SEARCH_STEPS)
    assert comparable_trials(trials) == comparable_trials(ref_trials)
    folder = StoreLayout(store).search(name)
    assert (folder / "best_sampler.json").is_file()
    assert temporaries(folder) == []


def test_train_resume_removes_what_a_kill_mid_checkpoint_left(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    run = StoreLayout(store).run("r")
    run.mkdir(parents=True)
    (run / ".tmp-checkpoint.pt.k1ll3d").write_bytes(b"PK\x03\x04 half a checkpoint")
    assert run_in_process("train", "--store", store, "--name", "r", "--preset", "digits",
                          "--epochs", "1", "--workers", "0", "--resume", "--json") == 0
    assert (run / "checkpoint.pt").is_file()
    assert temporaries(run) == []
