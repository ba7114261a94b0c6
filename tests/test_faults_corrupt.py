"""Damaged data: a truncated shard, garbage bytes inside an image, a Parquet part cut short,
a manifest whose checksums no longer match. Each must give a clear error (exit 2, a message,
no traceback) or a counted, logged skip; never a silent wrong result."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from faultlib import (
    base_store,
    copy_store,
    digests,
    make_checkpoint,
    run_in_process,
    temporaries,
)
from PIL import Image

from swift_sampler.storage import (
    QueryError,
    StoreError,
    StoreLayout,
    query,
    read_manifest,
    verify_shards,
)

K = 4
FEATURE_OPTS = ("--crops-per-image", str(K), "--quantiles", "32", "--angles", "8",
                "--batch-size", "64", "--no-progress", "--json")


def _main(*args) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    from swift_sampler.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error:"), err
    for needle in needles:
        assert needle.lower() in err.lower(), err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return base_store(tmp_path_factory)


@pytest.fixture(scope="module")
def jpeg_store(tmp_path_factory) -> Path:
    """3 classes x 16 tiny JPEGs, ingested (JPEG bytes are copied into the shards as they are)."""
    from swift_sampler.pipeline.ingest.build import ingest

    root = tmp_path_factory.mktemp("jpeg")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(16):
            px = np.clip(rng.normal(60 + 60 * c, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "src" / f"class{c}" / f"{i}.jpg", quality=90)
    (root / "src" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ingest(f"imagefolder:{root / 'src'}", root / "store", val_frac=0.2, test_frac=0.2, seed=0,
           shard_size=10, progress=False)
    return root / "store"


def _member(shard: Path, ext: str, nth: int = 0) -> tuple[str, int, int]:
    """(name, data offset, size) of the nth member with extension ``ext``."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("." + ext)]
    m = members[nth]
    return m.name, m.offset_data, m.size


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _garbage(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint8).tobytes()


def _fresh(src: Path, dst: Path) -> Path:
    store = copy_store(src, dst)
    for d in ("features", "tables", "runs"):
        shutil.rmtree(store / d, ignore_errors=True)
    (store / "features.json").unlink(missing_ok=True)
    return store


# -- ingest: an unreadable source image is skipped, counted and named --------------------------

def test_ingest_names_the_unreadable_image_it_skipped(jpeg_store):
    manifest = read_manifest(StoreLayout(jpeg_store))
    assert [s["source"] for s in manifest["skipped"]] == ["class1/broken.jpg"] or \
        [Path(s["source"]).name for s in manifest["skipped"]] == ["broken.jpg"]
    assert sum(v["count"] for v in manifest["splits"].values()) == 48


# -- a truncated shard -------------------------------------------------------------------------

def test_truncated_shard_stops_build_features_with_a_clear_error(base, tmp_path):
    store = _fresh(base, tmp_path / "store")
    shard = store / "shards" / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    code, _, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", ckpt, *FEATURE_OPTS)
    _clean_error(code, err, "train-000003.tar", "re-run ingest")
    assert not StoreLayout(store).features_meta.exists()
    assert verify_shards(StoreLayout(store), read_manifest(StoreLayout(store))) == [
        f"train-000003.tar: size {shard.stat().st_size} != {base.joinpath('shards/train-000003.tar').stat().st_size}"]


def test_truncated_shard_stops_training_naming_it_and_the_samples_missing(base, tmp_path):
    store = _fresh(base, tmp_path / "store")
    shard = store / "shards" / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, err = _main("train", "--store", store, "--name", "t", "--preset", "digits",
                         "--epochs", "1", "--workers", "0", "--json")
    _clean_error(code, err, "train-000003.tar", "samples cannot be read", "--skip-damaged")
    assert not (StoreLayout(store).run("t") / "summary.json").exists()


def test_truncated_shard_is_skipped_only_when_asked_and_the_samples_lost_are_counted(base, tmp_path, caplog):
    store = _fresh(base, tmp_path / "store")
    shard = store / "shards" / "train-000003.tar"
    count = read_manifest(StoreLayout(store))["splits"]["train"]["shards"][3]["count"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        code = run_in_process("train", "--store", store, "--name", "t", "--preset", "digits",
                              "--epochs", "1", "--workers", "0", "--skip-damaged", "--json")
    assert code == 0
    summary = json.loads((StoreLayout(store).run("t") / "summary.json").read_text())
    # About half the shard is gone: the count is of samples lost, not of the one error.
    assert count // 2 - 2 <= summary["skipped"] < count
    assert "train-000003.tar" in caplog.text


def test_truncated_test_shard_stops_evaluate(base, tmp_path):
    store = _fresh(base, tmp_path / "store")
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    shard = StoreLayout(store).shards("test")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, err = _main("evaluate", "--store", store, "--checkpoint", ckpt, "--workers", "0")
    _clean_error(code, err, shard.name, "samples cannot be read")
    code, out, err = _main("evaluate", "--store", store, "--checkpoint", ckpt, "--workers", "0",
                           "--skip-damaged", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["lost"] > 0


# -- garbage bytes inside an image -------------------------------------------------------------

def test_garbage_inside_a_jpeg_stops_build_features_naming_the_sample(jpeg_store, tmp_path):
    store = _fresh(jpeg_store, tmp_path / "store")
    shard = store / "shards" / "train-000001.tar"
    name, offset, size = _member(shard, "jpg", 3)
    _overwrite(shard, offset + size // 2, _garbage(16))  # the scan data: decoding fails
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    code, _, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", ckpt, *FEATURE_OPTS)
    _clean_error(code, err, name.split(".")[0], "cannot decode")
    assert not StoreLayout(store).features_meta.exists()


def test_garbage_inside_a_jpeg_is_a_counted_logged_skip_in_training(jpeg_store, tmp_path, caplog):
    store = _fresh(jpeg_store, tmp_path / "store")
    shard = store / "shards" / "train-000001.tar"
    name, offset, size = _member(shard, "jpg", 3)
    _overwrite(shard, offset + size // 2, _garbage(16))
    with caplog.at_level(logging.WARNING):
        code = run_in_process("train", "--store", store, "--name", "t", "--preset", "digits",
                              "--epochs", "1", "--workers", "0", "--batch-size", "5", "--json")
    assert code == 0
    # One epoch asks for all 30 samples, so the damaged one is met (and skipped) at least once.
    summary = json.loads((StoreLayout(store).run("t") / "summary.json").read_text())
    assert summary["skipped"] >= 1
    assert name.split(".")[0] in caplog.text


# -- checksums that no longer match ------------------------------------------------------------

def test_shard_changed_after_ingest_is_detected_by_build_features(jpeg_store, tmp_path):
    store = _fresh(jpeg_store, tmp_path / "store")
    shard = store / "shards" / "train-000001.tar"
    _, offset, size = _member(shard, "jpg", 3)
    # Garbage near the end of the scan: the JPEG still decodes, to different pixels.
    _overwrite(shard, offset + size - 20, _garbage(18))
    assert verify_shards(StoreLayout(store), read_manifest(StoreLayout(store))) == [
        "train-000001.tar: checksum mismatch"]
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    code, _, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", ckpt, *FEATURE_OPTS)
    _clean_error(code, err, "train-000001.tar")


@pytest.mark.slow
def test_manifest_checksum_mismatch_is_detected_by_training(base, tmp_path):
    store = _fresh(base, tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _main("train", "--store", store, "--name", "t", "--preset", "digits",
                         "--epochs", "1", "--workers", "0", "--json")
    _clean_error(code, err, "train-000000.tar")


def _understate(store: Path, split: str, by: int) -> tuple[str, int, int]:
    """Lower the manifest's count of the first shard of ``split`` (checksums stay true);
    returns (shard, true count, listed count)."""
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["splits"][split]["shards"][0]
    true = entry["count"]
    entry["count"] -= by
    manifest["splits"][split]["count"] -= by
    (store / "manifest.json").write_text(json.dumps(manifest))
    return entry["file"], true, entry["count"]


def test_manifest_that_understates_a_shard_stops_training_and_evaluate(base, tmp_path):
    store = _fresh(base, tmp_path / "store")
    ckpt = make_checkpoint(store, tmp_path / "w.pt")
    for split in ("train", "test"):
        name, true, listed = _understate(store, split, 5)
        needles = (name, f"holds {true} samples but the manifest lists {listed}", "re-run ingest")
        if split == "train":
            code, _, err = _main("train", "--store", store, "--name", "t", "--preset", "digits",
                                 "--epochs", "1", "--workers", "0", "--skip-damaged", "--json")
            _clean_error(code, err, *needles)
            assert not (StoreLayout(store).run("t") / "summary.json").exists()
        else:
            code, _, err = _main("evaluate", "--store", store, "--checkpoint", ckpt, "--workers", "0",
                                 "--skip-damaged", "--json")
            _clean_error(code, err, *needles)


def test_invalid_manifest_is_a_clear_error_for_every_reader(base, tmp_path):
    store = _fresh(base, tmp_path / "store")
    (store / "manifest.json").write_text('{"format": "swift-sampler-store", "version": 1')
    ckpt = make_checkpoint(base, tmp_path / "w.pt")
    for args in (("pipeline", "build-features", "--store", store, "--checkpoint", ckpt),
                 ("train", "--store", store, "--name", "t", "--epochs", "1")):
        code, _, err = _main(*args)
        _clean_error(code, err, "manifest.json", "not valid JSON")


# -- a Parquet feature part cut short ----------------------------------------------------------

@pytest.fixture(scope="module")
def featured(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("featured")
    store = copy_store(base, root / "store")
    ckpt = make_checkpoint(store, root / "w.pt")
    assert run_in_process("pipeline", "build-features", "--store", store, "--checkpoint", ckpt,
                          *FEATURE_OPTS) == 0
    return store, ckpt


def _cut_part(store: Path) -> Path:
    part = store / "features" / "part-000002.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    return part


def test_cut_feature_part_is_a_clear_error_in_sql(featured, tmp_path):
    store = copy_store(featured[0], tmp_path / "store")
    _cut_part(store)
    with pytest.raises(QueryError, match="part-000002.parquet"):
        query(store, "SELECT count(*) FROM features")


@pytest.mark.parametrize("number", [0, 2])  # the first part is the one DuckDB reads to bind
def test_any_cut_part_is_a_clear_error_and_the_other_views_still_work(featured, tmp_path, number):
    store = copy_store(featured[0], tmp_path / "store")
    part = store / "features" / f"part-{number:06d}.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size * 2 // 3])
    with pytest.raises(QueryError, match=part.name):
        query(store, "SELECT count(*) FROM features")
    assert query(store, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() > 0
    code, _, err = _main("sql", store, "SELECT avg(loss) FROM features")
    _clean_error(code, err, part.name)


def test_cut_feature_part_is_a_clear_error_for_tables(featured, tmp_path):
    from swift_sampler.pipeline.sampler.table_store import build_store_tables

    store = copy_store(featured[0], tmp_path / "store")
    _cut_part(store)
    with pytest.raises((StoreError, ValueError)) as info:
        build_store_tables(store, quantiles=16, angles=4)
    assert "part-000002" in str(info.value) or "parquet" in str(info.value).lower()


@pytest.mark.parametrize("overwrite", [False, True])
def test_build_features_rerun_over_a_cut_part_names_it_or_rescores_it(featured, tmp_path, overwrite):
    store, ckpt = featured
    store = copy_store(store, tmp_path / "store")
    _cut_part(store)
    code, out, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", ckpt,
                           *FEATURE_OPTS, *(("--overwrite",) if overwrite else ()))
    if code == 0:  # re-scored: the result must be whole again
        assert json.loads(out.splitlines()[-1])["rows"] == 320 * K
    else:
        _clean_error(code, err, "part-000002.parquet")
    assert temporaries(store) == []


def test_build_features_overwrite_that_fails_keeps_the_old_features_and_tables(featured, tmp_path):
    """--overwrite scores beside the old features and swaps them in only once all are checked:
    a damaged shard found on the way leaves the old features, features.json and tables whole,
    and the rerun keeps the new parts already scored."""
    store, _ = featured
    store = copy_store(store, tmp_path / "store")
    layout = StoreLayout(store)
    before = digests(store, "*.parquet") | digests(store, "*.json")
    other = make_checkpoint(store, tmp_path / "other.pt", seed=1)
    shards = layout.shards("train")
    intact = shards[-1].read_bytes()
    shards[-1].write_bytes(intact[: len(intact) // 2])
    code, _, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", other,
                         "--overwrite", *FEATURE_OPTS)
    _clean_error(code, err, shards[-1].name)
    assert digests(store, "*.json") == {k: v for k, v in before.items() if k.endswith(".json")}
    assert {k: v for k, v in digests(store, "*.parquet").items() if not k.startswith(".")} == \
        {k: v for k, v in before.items() if k.endswith(".parquet")}
    assert query(store, "SELECT count(*) AS n FROM features")["n"][0].as_py() == 320 * K

    shards[-1].write_bytes(intact)
    code, out, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", other,
                           "--overwrite", *FEATURE_OPTS)
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["rows"] == 320 * K and summary["parts_skipped"] > 0  # scored beside, kept
    sha = hashlib.sha256(other.read_bytes()).hexdigest()
    assert json.loads(layout.features_meta.read_text())["checkpoint_sha256"] == sha
    assert json.loads(layout.tables_meta.read_text())["features_checkpoint_sha256"] == sha
    assert not [p for p in store.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert temporaries(store) == []


def test_corrupt_features_json_is_named(featured, tmp_path):
    store, ckpt = featured
    store = copy_store(store, tmp_path / "store")
    StoreLayout(store).features_meta.write_text("{not json")
    code, _, err = _main("pipeline", "build-features", "--store", store, "--checkpoint", ckpt, *FEATURE_OPTS)
    _clean_error(code, err, "features.json")
