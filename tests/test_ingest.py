"""Ingest: shards readable by plain tools, noise and splits as specified, bad input refused,
crash leaves nothing that reads as complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from swift_sampler.cli import main
from swift_sampler.pipeline.ingest.build import IngestError, ingest
from swift_sampler.pipeline.ingest.noise import NoiseSpecError
from swift_sampler.pipeline.ingest.shards import iter_split
from swift_sampler.pipeline.ingest.sources import SourceError
from swift_sampler.pipeline.ingest.splits import SplitError, stratified_split, stratified_subset
from swift_sampler.storage import StoreError, StoreLayout, query, read_manifest, verify_shards

REPO = Path(__file__).resolve().parents[1]


def _samples(store):
    return pq.read_table(StoreLayout(store).samples).to_pylist()


def make_folder(root: Path, sizes: dict[str, int], *, fmt="JPEG", seed=0) -> Path:
    """A tiny image folder: one subfolder per class, random 8x8 RGB images."""
    rng = np.random.default_rng(seed)
    for name, n in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            img.save(root / name / f"{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", format=fmt)
    return root


# --- the digits store (conftest: val 0.2, test 0.2, symmetric:0.4, shard_size 400) ---

def test_manifest_samples_view_and_shards_agree(digits_store):
    manifest = read_manifest(StoreLayout(digits_store))
    rows = query(digits_store, "SELECT split, count(*) AS n FROM samples GROUP BY split")
    counts = {r["split"]: r["n"] for r in rows.to_pylist()}
    assert counts == {s: info["count"] for s, info in manifest["splits"].items()}
    assert sum(counts.values()) == 1797
    for info in manifest["splits"].values():
        assert sum(s["count"] for s in info["shards"]) == info["count"]
        assert all(s["count"] <= 400 for s in info["shards"])
    assert verify_shards(StoreLayout(digits_store), manifest) == []
    assert manifest["image"] == {"ext": "png", "channels": 1, "height": 8, "width": 8}
    assert manifest["skipped"] == []


def test_shards_read_back_with_webdataset_and_tar(digits_store):
    layout = StoreLayout(digits_store)
    rows = {r["key"]: r for r in _samples(digits_store)}
    train = layout.shards("train")
    assert len(train) == 3  # 1077 train samples at 400 per shard
    seen = []
    ds = wds.WebDataset([str(p) for p in train], shardshuffle=False, empty_check=False)
    for sample in ds:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        row = rows[key]
        assert int(sample["cls"]) == meta["label"] == row["label"]
        assert meta["index"] == row["index"] and meta["true_label"] == row["true_label"]
        assert meta["noisy"] == row["noisy"] == (row["label"] != row["true_label"])
        assert sample["png"].startswith(b"\x89PNG")
        seen.append(key)
    assert seen == [f"train-{i:08d}" for i in range(len(seen))]
    assert len(seen) == sum(r["split"] == "train" for r in rows.values())

    names = subprocess.run(["tar", "tf", str(layout.shard("val", 0))], check=True,
                           capture_output=True, text=True).stdout.split()
    assert names[:3] == ["val-00000000.png", "val-00000000.cls", "val-00000000.json"]
    assert len(names) == 3 * sum(r["split"] == "val" for r in rows.values())


def test_iter_split_yields_index_order(digits_store):
    out = list(iter_split(digits_store, "test"))
    assert [s.meta["index"] for s in out] == list(range(len(out)))
    assert all(s.ext == "png" and "true_label" not in s.meta for s in out)  # test is clean


def test_realised_noise_per_split(digits_store):
    manifest = read_manifest(StoreLayout(digits_store))
    rows = _samples(digits_store)
    for split in ("train", "val"):
        noisy = np.array([r["noisy"] for r in rows if r["split"] == split])
        assert abs(noisy.mean() - 0.4) <= 0.005
        assert manifest["noise"]["realised"][split] == pytest.approx(noisy.mean())
    assert not any(r["noisy"] or r["label"] != r["true_label"] for r in rows if r["split"] == "test")


def test_stratified_splits(digits_store):
    rows = _samples(digits_store)
    true = np.array([r["true_label"] for r in rows])
    split = np.array([r["split"] for r in rows])
    for c in range(10):
        n_c = (true == c).sum()
        for name, frac in (("val", 0.2), ("test", 0.2)):
            assert abs(((true == c) & (split == name)).sum() - frac * n_c) <= 0.5 + 1e-9
    # Shards mix classes: the first 100 training samples cover every class.
    first = [r["true_label"] for r in rows if r["split"] == "train" and r["index"] < 100]
    assert len(set(first)) == 10


def test_same_seed_same_store_different_seed_differs(tmp_path):
    kw = dict(val_frac=0.1, test_frac=0.1, noise="symmetric:0.2", limit=600, progress=False)
    a = ingest("digits", tmp_path / "a", seed=5, **kw)
    b = ingest("digits", tmp_path / "b", seed=5, **kw)
    ingest("digits", tmp_path / "c", seed=6, **kw)
    assert a["store_id"] != b["store_id"]
    ra, rb, rc = (_samples(tmp_path / n) for n in "abc")
    assert ra == rb
    assert [(r["key"], r["source"], r["label"]) for r in ra] != \
           [(r["key"], r["source"], r["label"]) for r in rc]
    ma, mb = (read_manifest(StoreLayout(tmp_path / n)) for n in "ab")
    assert ma["splits"] == mb["splits"]  # byte-identical shards (same sha256)


def test_splits_and_subset_functions():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    sub = stratified_subset(labels, 50, seed=0)
    assert len(sub) == 50 and list(np.bincount(labels[sub])) == [5, 10, 15, 20]
    parts = stratified_split(labels, val_frac=0.1, test_frac=0.2, seed=0)
    allpos = np.concatenate(list(parts.values()))
    assert sorted(allpos) == list(range(100))
    with pytest.raises(SplitError, match="leaves nothing to train"):
        stratified_split(labels, val_frac=0.5, test_frac=0.5)
    with pytest.raises(SplitError, match="class 'a' has only 1"):
        stratified_split(np.array([0, 1, 1, 1]), val_frac=0.5, test_frac=0.4, classes=["a", "b"])
    with pytest.raises(SplitError, match="val split empty"):
        stratified_split(labels, val_frac=0.001, test_frac=0.0)


# --- image folders ---

def test_cifar_subset_copies_jpeg_bytes(tmp_path, shared_cifar):
    s = ingest(f"imagefolder:{shared_cifar}", tmp_path / "c", limit=500, seed=1,
               noise="asymmetric:0.4", progress=False)
    assert sum(s["counts"].values()) == 500 and s["skipped"] == 0
    manifest = read_manifest(StoreLayout(tmp_path / "c"))
    assert manifest["image"] == {"ext": "jpg", "channels": 3, "height": 32, "width": 32}
    rows = {r["key"]: r for r in _samples(tmp_path / "c")}
    assert list(np.bincount([r["true_label"] for r in rows.values()])) == [50] * 10
    for split in ("train", "val", "test"):
        for sample in iter_split(tmp_path / "c", split, manifest=manifest):
            src = Path(shared_cifar) / rows[sample.key]["source"]
            assert sample.ext == "jpg" and sample.image == src.read_bytes()
    # Asymmetric CIFAR-10 flips half the classes: realised = R * share of source classes.
    for split in ("train", "val"):
        assert abs(manifest["noise"]["realised"][split]
                   - manifest["noise"]["expected"][split]) <= 0.5 / s["counts"][split] + 1e-9


def test_corrupt_images_are_skipped_counted_and_named(tmp_path):
    src = make_folder(tmp_path / "src", {"a": 12, "b": 12})
    good = (src / "a" / "000.jpg").read_bytes()
    (src / "a" / "000.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (src / "b" / "notes.txt").write_text("not an image")
    (src / "b" / "empty.jpg").write_bytes(b"")
    s = ingest(f"imagefolder:{src}", tmp_path / "st", val_frac=0.25, test_frac=0.25,
               progress=False)
    assert s["skipped"] == 3 and sum(s["counts"].values()) == 24 + 2 - 3
    skipped = {d["source"]: d["reason"] for d in read_manifest(StoreLayout(tmp_path / "st"))["skipped"]}
    assert set(skipped) == {"a/000.jpg", "b/notes.txt", "b/empty.jpg"}
    assert "truncated" in skipped["a/000.jpg"] and "not a JPEG or PNG" in skipped["b/notes.txt"]
    assert "a/000.jpg" not in {r["source"] for r in _samples(tmp_path / "st")}


def test_png_folder_and_separate_test_source(tmp_path):
    train = make_folder(tmp_path / "train", {"x": 10, "y": 10}, fmt="PNG")
    test = make_folder(tmp_path / "test", {"y": 3}, fmt="PNG", seed=1)
    s = ingest(f"imagefolder:{train}", tmp_path / "st", val_frac=0.2, test_frac=0.0,
               test_source=f"imagefolder:{test}", progress=False)
    assert s["counts"] == {"train": 16, "val": 4, "test": 3}
    rows = [r for r in _samples(tmp_path / "st") if r["split"] == "test"]
    assert {r["true_label"] for r in rows} == {1}  # 'y' is class 1 of the training source
    assert read_manifest(StoreLayout(tmp_path / "st"))["image"]["ext"] == "png"
    with pytest.raises(IngestError, match="--test-frac must be 0"):
        ingest(f"imagefolder:{train}", tmp_path / "st2", test_frac=0.1,
               test_source=f"imagefolder:{test}", progress=False)


@pytest.mark.parametrize("setup, error, words", [
    (lambda p: p / "missing", SourceError, "does not exist"),
    (lambda p: p.mkdir() or p, SourceError, "no class subfolders"),
    (lambda p: (p / "a").mkdir(parents=True) or p, SourceError, "holds no files"),
])
def test_bad_source_folders(tmp_path, setup, error, words):
    folder = setup(tmp_path / "src")
    with pytest.raises(error, match=words):
        ingest(f"imagefolder:{folder}", tmp_path / "st", progress=False)
    assert not (tmp_path / "st").exists()


def test_bad_arguments_fail_before_touching_the_store(tmp_path):
    src = make_folder(tmp_path / "src", {"a": 10, "b": 2})
    with pytest.raises(NoiseSpecError):
        ingest("digits", tmp_path / "st", noise="symmetric:1.5", progress=False)
    with pytest.raises(IngestError, match="leaves nothing to train"):
        ingest("digits", tmp_path / "st", val_frac=0.5, test_frac=0.5, progress=False)
    with pytest.raises(IngestError, match="class 'b' has only 2"):
        ingest(f"imagefolder:{src}", tmp_path / "st", val_frac=0.3, test_frac=0.3,
               progress=False)
    with pytest.raises(SourceError, match="unknown source"):
        ingest("mnist", tmp_path / "st", progress=False)
    assert not (tmp_path / "st").exists()


def test_store_with_data_refused_then_overwritten(tmp_path):
    first = ingest("digits", tmp_path / "st", limit=300, progress=False)
    with pytest.raises(StoreError, match="already holds data"):
        ingest("digits", tmp_path / "st", limit=200, progress=False)
    (tmp_path / "st" / "runs" / "r1").mkdir(parents=True)
    second = ingest("digits", tmp_path / "st", limit=200, overwrite=True, progress=False)
    layout = StoreLayout(tmp_path / "st")
    manifest = read_manifest(layout)
    assert manifest["store_id"] == second["store_id"] != first["store_id"]
    assert sum(second["counts"].values()) == 200 and verify_shards(layout, manifest) == []
    assert not (layout.runs_dir).exists()  # runs of the old data go with it
    assert sorted(p.name for p in layout.root.iterdir()) == [
        ".lock-ingest", "manifest.json", "samples.parquet", "shards"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("keep me")
    with pytest.raises(StoreError, match="not part of a store"):
        ingest("digits", tmp_path / "other", overwrite=True, progress=False)
    assert (tmp_path / "other" / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("fails", ["atomic_write_parquet", "write_manifest"])
def test_failed_overwrite_keeps_the_old_store(tmp_path, monkeypatch, fails):
    ingest("digits", tmp_path / "st", limit=300, progress=False)
    layout = StoreLayout(tmp_path / "st")
    before = read_manifest(layout)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # Fails while building (parquet) or while swapping the new data in (manifest).
    monkeypatch.setattr(f"swift_sampler.pipeline.ingest.build.{fails}", boom)
    with pytest.raises(OSError, match="disk full"):
        ingest("digits", tmp_path / "st", limit=200, overwrite=True, progress=False)
    assert read_manifest(layout) == before and verify_shards(layout, before) == []
    assert not [p for p in layout.root.rglob(".tmp-*")]


def test_killed_run_leaves_no_complete_store_and_next_run_cleans(tmp_path):
    store = tmp_path / "st"
    # Die hard (no finally, no cleanup) in the middle of writing the second shard.
    script = textwrap.dedent(f"""
        import os, swift_sampler.pipeline.ingest.shards as shards
        real = shards.TarWriter.add_sample
        calls = [0]
        def add_sample(self, sample):
            calls[0] += 1
            if calls[0] == 350:
                os._exit(9)
            real(self, sample)
        shards.TarWriter.add_sample = add_sample
        from swift_sampler.pipeline.ingest.build import ingest
        ingest("digits", {str(store)!r}, shard_size=200, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    layout = StoreLayout(store)
    assert not layout.manifest.exists() and not layout.shards_dir.exists()
    with pytest.raises(StoreError, match="manifest.json missing"):
        query(store, "SELECT count(*) FROM samples")
    leftovers = [p for p in store.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the staging folder of the dead run, full of partial shards
    ingest("digits", store, shard_size=200, progress=False)
    assert not [p for p in store.rglob(".tmp-*")]
    assert verify_shards(layout, read_manifest(layout)) == []


def test_cli_ingest_and_errors(tmp_path, capsys):
    rc = main(["pipeline", "ingest", "--source", "digits", "--store", str(tmp_path / "st"),
               "--limit", "200", "--noise", "symmetric:0.2", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    summary = json.loads(out[-1])
    assert summary["command"] == "pipeline ingest" and sum(summary["counts"].values()) == 200
    rc = main(["pipeline", "ingest", "--source", "digits", "--store", str(tmp_path / "st2"),
               "--limit", "200"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and "samples" in out[0] + out[1] + out[2] and json.loads(out[-1])["skipped"] == 0
    for argv, words in [
        (["--noise", "foo"], "bad noise spec"),
        (["--val-frac", "0.6", "--test-frac", "0.6"], "leaves nothing to train"),
        (["--source", f"imagefolder:{tmp_path / 'nope'}"], "does not exist"),
    ]:
        base = ["pipeline", "ingest", "--source", "digits", "--store", str(tmp_path / "st3")]
        assert main(base + argv) == 2
        assert words in capsys.readouterr().err
    assert main(["pipeline", "ingest", "--source", "digits", "--store", str(tmp_path / "st")]) == 2
    assert "already holds data" in capsys.readouterr().err


def test_torchvision_offline_fails_fast(tmp_path, monkeypatch):
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("SWIFT_SAMPLER_DATA", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="unreachable"):
        ingest("torchvision:cifar10", tmp_path / "st", progress=False)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "st").exists()


def test_shard_count_mismatch_is_detected(digits_store, tmp_path):
    store = tmp_path / "copy"
    shutil.copytree(digits_store, store)
    layout = StoreLayout(store)
    manifest = json.loads(layout.manifest.read_text())
    manifest["splits"]["test"]["shards"][0]["count"] += 1
    layout.manifest.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="manifest says"):
        list(iter_split(store, "test"))
    assert os.path.exists(layout.shard("test", 0))


# -- the shard reader ------------------------------------------------------------------------


def _tarfile_members(path):
    """Reference: (name, bytes) of the regular members, read by the standard library."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"])
def test_read_tar_matches_tarfile_and_webdataset_grouping(tmp_path, fmt):
    """Long names (GNU long-name members, pax path records, ustar prefixes), a directory and a
    link among the files: the same members as ``tarfile``, the same samples as
    ``webdataset``'s ``group_by_keys``."""
    import io
    import tarfile

    from webdataset.tariterators import group_by_keys

    from swift_sampler.pipeline.ingest.shards import group_members, iter_tar, read_tar

    rng = np.random.default_rng(1)
    deep = "d" * 60 + "/" + "e" * 70  # > 100 bytes with the file name: needs a long name
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tar:
        info = tarfile.TarInfo("sub")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i, key in enumerate(["k-0", f"{deep}/k-1", "sub/k.2", "K-3"]):
            for ext in ("PNG", "cls", "json"):
                data = rng.bytes(int(rng.integers(0, 1500)))
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if i == 1:
                link = tarfile.TarInfo("k-1.lnk")
                link.type, link.linkname = tarfile.SYMTYPE, "k-0.cls"
                tar.addfile(link)
    members = list(read_tar(path))
    assert members[-1] == {} and all(m["__url__"] == str(path) for m in members[:-1])
    assert [(m["fname"], m["data"]) for m in members[:-1]] == _tarfile_members(path)
    ours = list(group_members(iter(members)))
    assert ours == list(group_by_keys(iter(members)))
    assert [s["__key__"] for s in ours] == ["k-0", f"{deep}/k-1", "sub/k", "K-3"]
    assert set(ours[2]) == {"__key__", "__url__", "2.png", "2.cls", "2.json"}
    kept = list(group_members(iter(members), keep=("png", "cls")))
    assert [set(s) - {"__key__", "__url__"} for s in kept] == [{"png", "cls"}, {"png", "cls"}, set(),
                                                               {"png", "cls"}]
    assert [k for k, _ in iter_tar(path)] == ["k-0", "k-1", "k", "K-3"]  # base names
    # The count check before the first member groups the members the same way.
    assert list(read_tar(path, count=4)) == members
    for listed in (3, 5):
        with pytest.raises(StoreError, match=f"a.tar holds 4 samples but the manifest lists {listed}"):
            next(read_tar(path, count=listed))


def test_damaged_tar_raises_naming_the_shard_after_the_good_members(digits_store, tmp_path):
    """A broken header, a member cut short, a missing end-of-archive marker: each raises
    ShardReadError (a StoreError and an OSError) naming the shard, after yielding the members
    before the damage unchanged; iter_split stops on it."""
    import tarfile

    from swift_sampler.pipeline.ingest.shards import ShardReadError, read_tar

    source = StoreLayout(digits_store).shard("test", 0)
    good = source.read_bytes()
    with tarfile.open(source) as tar:
        fourth = list(tar)[3]  # first member of the second sample
    end = len(good) - 1024  # where the end-of-archive marker starts
    broken = bytearray(good)
    broken[fourth.offset + 5] ^= 1  # inside its name: the header checksum no longer matches
    cases = {  # damage -> (message, members read before it)
        bytes(broken): ("bad tar header", 3),
        good[: fourth.offset_data + 1]: ("member truncated", 3),
        good[:end]: ("no end-of-archive marker", None),
    }
    path = tmp_path / "test-000000.tar"
    path.write_bytes(good)
    intact = list(read_tar(path))
    for data, (words, count) in cases.items():
        path.write_bytes(data)
        got = []
        with pytest.raises(ShardReadError, match=f"^test-000000.tar: .*{words}.*re-run ingest"):
            for m in read_tar(path):
                got.append(m)
        assert got == intact[: len(got)] and len(got) == (count or len(intact) - 1)
    assert issubclass(ShardReadError, StoreError) and issubclass(ShardReadError, OSError)
    store = tmp_path / "copy"
    shutil.copytree(digits_store, store)
    StoreLayout(store).shard("test", 0).write_bytes(good[:end])
    with pytest.raises(StoreError, match="no end-of-archive marker"):
        list(iter_split(store, "test"))


def test_an_existing_store_names_the_python_argument_too(tmp_path):
    from swift_sampler.pipeline.ingest.build import ingest as do_ingest

    store = tmp_path / "store"
    do_ingest("digits", store, limit=200, val_frac=0.2, test_frac=0.2, progress=False)
    with pytest.raises(StoreError, match=r"--overwrite \(overwrite=True from Python\)"):
        do_ingest("digits", store, limit=200, val_frac=0.2, test_frac=0.2, progress=False)
