"""storage/: atomic writes, locks, manifest validation, shard checksums, tar layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from swift_sampler.pipeline.ingest.shards import tar_header, write_shards
from swift_sampler.storage import (
    LockedError,
    StoreError,
    StoreLayout,
    atomic_write_bytes,
    atomic_write_json,
    atomic_writer,
    check_name,
    exclusive_lock,
    read_manifest,
    remove_stale_temporaries,
    verify_shards,
    write_manifest,
)


def test_atomic_writer_keeps_old_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_writer(path) as f:
            f.write(b'{"v": 2, "half')
            raise RuntimeError("mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_replaces_and_uses_umask_mode(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    lock = tmp_path / ".lock-ingest"
    code = ("import sys; from storage import exclusive_lock, LockedError\n"
            "try:\n"
            f"    with exclusive_lock({str(lock)!r}, 'store X'): sys.exit(0)\n"
            "except LockedError as e:\n"
            "    print(e); sys.exit(3)\n")
    with exclusive_lock(lock, "store X"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 3 and "store X is in use" in proc.stdout
        # A second open file description in the same process is refused too (flock semantics).
        with pytest.raises(LockedError, match="store X"):
            with exclusive_lock(lock, "store X"):
                pass
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0  # released on exit


def test_remove_stale_temporaries_files_and_folders(tmp_path):
    (tmp_path / ".tmp-a.json.123").write_text("x")
    (tmp_path / ".tmp-ingest-1" / "shards").mkdir(parents=True)
    (tmp_path / ".tmp-ingest-1" / "shards" / ".tmp-train-000000.tar.9").write_text("x")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / ".tmp-ckpt.1").write_text("x")
    (tmp_path / "keep.txt").write_text("x")
    assert remove_stale_temporaries(tmp_path, recursive=False) == 2
    assert (tmp_path / "runs" / "r" / ".tmp-ckpt.1").exists()
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "r", "runs"]


def _manifest(shard_name):
    return {"store_id": "x", "classes": ["a"], "noise": {}, "seed": 0,
            "splits": {"train": {"count": 1, "shards": [
                {"file": shard_name, "count": 1, "bytes": 0, "sha256": ""}]}}}


@pytest.mark.parametrize("name", ["../train-000000.tar", "train/../../x.tar", "/etc/passwd",
                                  "val-000000.tar", ".."])
def test_manifest_rejects_shard_names_leaving_shards_dir(tmp_path, name):
    layout = StoreLayout(tmp_path)
    with pytest.raises(StoreError, match="bad shard file name"):
        write_manifest(layout, _manifest(name))
    assert not layout.manifest.exists()
    layout.manifest.write_text(json.dumps({"format": "swift-sampler-store", "version": 1,
                                           **_manifest(name)}))
    with pytest.raises(StoreError, match="bad shard file name"):
        read_manifest(layout)


def test_read_manifest_errors_are_clear(tmp_path):
    layout = StoreLayout(tmp_path)
    with pytest.raises(StoreError, match="manifest.json missing"):
        read_manifest(layout)
    layout.manifest.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        read_manifest(layout)
    layout.manifest.write_text(json.dumps({"format": "swift-sampler-store", "version": 1}))
    with pytest.raises(StoreError, match="missing field"):
        read_manifest(layout)


def test_verify_shards_detects_modified_missing_and_truncated(digits_store, tmp_path):
    store = tmp_path / "copy"
    shutil.copytree(digits_store, store)
    layout = StoreLayout(store)
    manifest = read_manifest(layout)
    assert verify_shards(layout, manifest) == []
    shard = layout.shard("train", 1)
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    layout.shard("val", 0).unlink()
    with open(layout.shard("test", 0), "r+b") as f:
        f.truncate(1024)
    problems = verify_shards(layout, manifest)
    assert sorted(problems) == sorted([
        "train-000001.tar: checksum mismatch", "val-000000.tar: missing",
        f"test-000000.tar: size 1024 != {manifest['splits']['test']['shards'][0]['bytes']}"])


def test_layout_refuses_paths_outside_and_bad_names(tmp_path):
    layout = StoreLayout(tmp_path / "st")
    assert layout.inside(tmp_path / "st" / "runs" / "a") == (tmp_path / "st" / "runs" / "a")
    with pytest.raises(StoreError, match="outside the store"):
        layout.inside(tmp_path / "st" / ".." / "elsewhere")
    for bad in ["..", "a/b", "", "x" * 200]:
        with pytest.raises(StoreError):
            check_name(bad)


@pytest.mark.parametrize("name, size", [("train-00000000.jpg", 0), ("val-00000012.json", 57),
                                        ("k.png", 8**11 - 1)])
def test_tar_header_matches_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT)


def test_write_shards_round_trip_with_tarfile(tmp_path):
    samples = [{"__key__": f"s-{i:08d}", "jpg": bytes([i]) * (i * 300), "cls": b"%d" % i}
               for i in range(7)]
    shards = write_shards(iter(samples), folder=tmp_path, split="s", shard_size=3)
    assert [s["count"] for s in shards] == [3, 3, 1]
    got = []
    for s in shards:
        path = tmp_path / s["file"]
        assert path.stat().st_size == s["bytes"]
        with tarfile.open(path) as tar:
            got += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    want = [(f"{x['__key__']}.{e}", x[e]) for x in samples for e in ("jpg", "cls")]
    assert got == want
