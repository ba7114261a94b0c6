"""``manifest.json``: what a store holds, written last by ingest so that its presence means
the shards beside it are complete.

Fields: ``format``, ``version``, ``store_id`` (a fresh UUID per ingest, used for provenance),
``created``, ``source``, ``classes``, ``image`` (``ext`` and size), ``splits`` (per split: ``count``
and ``shards`` = [{``file``, ``count``, ``bytes``, ``sha256``}]), ``noise`` (``spec``, ``kind``,
``rate``, ``realised`` per split), ``seed``, ``skipped`` (unreadable sources, by name),
``versions`` (packages). Later stages add nothing here: they write their own metadata files.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .layout import StoreError, StoreLayout

FORMAT = "swift-sampler-store"
VERSION = 1
REQUIRED = ("format", "version", "store_id", "classes", "splits", "noise", "seed")
_PACKAGES = ("torch", "torchvision", "webdataset", "pyarrow", "duckdb", "numpy", "pillow",
             "scikit-learn", "nevergrad", "swift-sampler")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(layout: StoreLayout, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    _validate(manifest, layout.manifest)
    atomic_write_json(layout.manifest, manifest)


def read_features_meta(layout) -> dict[str, Any]:
    """``features.json`` as a dict; ``StoreError`` naming the file when it is not one."""
    return read_json_object(layout.features_meta,
                            "delete it and run build-features again (finished parts are kept)")


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """A JSON object read from ``path`` (parsed as data, never evaluated); ``StoreError`` naming
    the file and saying ``fix`` when it is not one."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path} is not valid JSON (expected an object); {fix}")
    return obj


def read_manifest(layout: StoreLayout) -> dict[str, Any]:
    """Load and validate the manifest; raise ``StoreError`` naming what is wrong."""
    layout.require()
    manifest = read_json_object(layout.manifest, "re-run ingest")
    _validate(manifest, layout.manifest)
    return manifest


def _validate(m: Any, where: Path) -> None:
    if not isinstance(m, dict):
        raise StoreError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise StoreError(f"{where}: missing field(s) {', '.join(missing)}")
    if m["format"] != FORMAT or m["version"] != VERSION:
        raise StoreError(f"{where}: unsupported format {m['format']!r} version {m['version']!r}")
    if not isinstance(m["classes"], list) or not m["classes"]:
        raise StoreError(f"{where}: field 'classes' must be a non-empty list")
    for split, info in m["splits"].items():
        for shard in info.get("shards", []):
            name = shard.get("file", "")
            # A manifest is data: a shard name must never point outside shards/.
            if Path(name).name != name or not name.startswith(f"{split}-"):
                raise StoreError(f"{where}: bad shard file name {name!r} in split {split!r}")


def num_classes(manifest: dict[str, Any]) -> int:
    return len(manifest["classes"])


def split_shards(layout: StoreLayout, manifest: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    """(path, sample count) of every shard of ``split``, as listed by the manifest."""
    info = manifest["splits"].get(split)
    if not info or not info.get("shards"):
        raise StoreError(
            f"store {layout.root} has no {split!r} shards; ingest with a non-empty {split} split"
        )
    return [(layout.shards_dir / s["file"], int(s["count"])) for s in info["shards"]]


def verify_shards(layout: StoreLayout, manifest: dict[str, Any]) -> list[str]:
    """Recompute every shard checksum; return one line per problem (empty list: all good)."""
    problems = []
    for info in manifest["splits"].values():
        for s in info.get("shards", []):
            path = layout.shards_dir / s["file"]
            if not path.is_file():
                problems.append(f"{s['file']}: missing")
            elif path.stat().st_size != s["bytes"]:
                problems.append(f"{s['file']}: size {path.stat().st_size} != {s['bytes']}")
            elif sha256_file(path) != s["sha256"]:
                problems.append(f"{s['file']}: checksum mismatch")
    return problems
