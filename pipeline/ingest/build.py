"""Ingest: a source of labelled images -> a store of WebDataset shards, samples.parquet and
manifest.json (the store layout of the project's design).

Steps: open the source; take a seeded stratified subset (``limit``); decode every image once
to validate it (corrupt files are skipped, counted and named in the manifest); split train /
val / test by class (or take test from ``test_source``); shuffle each split (seeded) so shards
mix classes; inject label noise into train and val; write shards, then samples.parquet, then
the manifest.

Image format: a store holds one format. An image folder of JPEGs becomes ``KEY.jpg`` with the
file's bytes copied as they are; a folder of PNGs becomes ``KEY.png``; a folder that mixes
both is refused (convert it first). Array sources (digits, torchvision) are stored as PNG.

Crash safety: everything is built in a staging folder ``STORE/.tmp-ingest-*`` and moved into
place only when complete; the manifest is written last, so a store without manifest.json is
incomplete by definition, and the next ingest removes the leftovers (staging folders, and the
``shards/`` and ``samples.parquet`` a kill between moving them in and writing the manifest
leaves). ``overwrite`` moves the old store's entries aside only after the new data is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from swift_sampler.storage import (
    SPLITS,
    LockedError,
    StoreError,
    StoreLayout,
    atomic_write_parquet,
    exclusive_lock,
    package_versions,
    remove_stale_temporaries,
    write_manifest,
)
from swift_sampler.storage.arguments import check_call
from swift_sampler.storage.errors import SwiftSamplerError
from swift_sampler.storage.schemas import SAMPLES

from .noise import expected_rate, inject_noise, parse_noise
from .shards import write_shards
from .sources import CorruptImageError, ImageInfo, Item, SourceError, open_source, probe
from .splits import SplitError, stratified_split, stratified_subset

# Entries a store may hold; anything else in the folder means it is not a store.
# Everything a store's own stages write (``figures`` by ``swift-sampler plot``).
STORE_ENTRIES = ("manifest.json", "samples.parquet", "shards", "features", "features.json",
                 "tables", "runs", "searches", "figures")
_STREAM = {"subset": 1, "split": 2, "shuffle": 3, "noise": 4}
# What a commit cut short leaves without a manifest; shards/ must hold only shard files.
LEFTOVER_ENTRIES = ("samples.parquet", "shards")
_SHARD_FILE = re.compile(rf"({'|'.join(SPLITS)})-\d{{6}}\.tar")

log = logging.getLogger(__name__)


class IngestError(SwiftSamplerError, ValueError):
    """Inputs that cannot make a valid store; the message says what to change."""


def ingest(source: str, store: str | os.PathLike, *, val_frac: float = 0.1,
           test_frac: float = 0.1, test_source: str | None = None, noise: str = "none",
           seed: int = 0, limit: int | None = None, shard_size: int = 5000,
           labels: str | os.PathLike | None = None, overwrite: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Build a store from ``source``; return a summary dict.

    Args:
        source: ``imagefolder:DIR``, ``digits`` or ``torchvision:cifar10|cifar100``.
        store: the store directory (created if missing).
        val_frac, test_frac: per-class fractions for val and test (stratified, seeded).
        test_source: a separate test set (same class names); then ``test_frac`` must be 0.
        noise: ``none``, ``symmetric:R`` or ``asymmetric:R``; applied to train and val only.
        seed: drives subset, split, shuffle and noise; same seed -> same store content.
        limit: keep a seeded stratified subset of this many images of ``source`` (a
            ``test_source`` is taken whole).
        shard_size: samples per shard.
        labels: a CSV or Parquet file ``path,label`` (``pipeline.ingest.label_file``) whose labels
            replace the source's for train and val; the source's labels stay as ``true_label``
            / ``noisy`` for diagnostics (as with injected noise) and label the test split.
            Cannot be combined with ``noise``. A flat ``imagefolder:DIR`` (images, no class
            subfolders) takes its classes and every label, the test split's too, from it.
        overwrite: replace a store that already holds data (including its features, runs and
            searches, which belong to the old data).
        progress: show tqdm progress bars on stderr.

    Returns:
        {"store", "store_id", "source", "classes", "counts" {split: n}, "noise" {spec,
        realised}, "shards", "bytes", "skipped", "seconds", "images_per_s"}.
    """
    check_call(ingest, locals())
    t0 = time.perf_counter()
    spec = parse_noise(noise)
    if labels is not None and spec.kind != "none":
        raise IngestError(f"--labels {labels} gives the noisy labels itself; drop --noise {noise}")
    if test_source and test_frac:
        raise IngestError(f"--test-source gives the test split, so --test-frac must be 0 "
                          f"(got {test_frac:g})")
    if shard_size < 1:
        raise IngestError(f"--shard-size must be positive, got {shard_size}")
    layout = StoreLayout(store)
    try:
        _check_store(layout, overwrite)  # fail before the slow part; checked again under the lock
    except StoreError:
        _sweep_staging(layout)
        raise
    src = open_source(source, labels=labels)
    tsrc = open_source(test_source, split="test") if test_source else None
    label_map = None
    if labels is not None:
        from .label_file import read_label_file

        label_map = read_label_file(labels, classes=src.classes, names=[it.name for it in src.items])
        label_map = (label_map[0], {"file": str(Path(labels).resolve()), "sha256": label_map[1]})

    created = not layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    staging = layout.root / f".tmp-ingest-{uuid.uuid4().hex[:12]}"
    try:
        with exclusive_lock(layout.lock("ingest"), f"store {layout.root}"):
            remove_stale_temporaries(layout.root, recursive=False)
            _check_store(layout, overwrite, clean=True)
            manifest = _build(src, tsrc, layout.inside(staging), spec=spec, val_frac=val_frac,
                              test_frac=test_frac, seed=seed, limit=limit,
                              shard_size=shard_size, progress=progress, label_map=label_map)
            _commit(layout, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not layout.manifest.exists():
            _remove_if_only_lock(layout)
    splits = manifest["splits"]
    total = sum(s["count"] for s in splits.values())
    seconds = time.perf_counter() - t0
    return {
        "store": str(layout.root), "store_id": manifest["store_id"], "source": source,
        "test_source": test_source, "classes": len(manifest["classes"]),
        "counts": {k: v["count"] for k, v in splits.items()},
        "noise": {"spec": manifest["noise"]["spec"], "realised": manifest["noise"]["realised"]},
        "shards": sum(len(v["shards"]) for v in splits.values()),
        "bytes": sum(s["bytes"] for v in splits.values() for s in v["shards"]),
        "skipped": len(manifest["skipped"]), "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }


def validate(items: Iterable[Item], *, skipped: list[dict[str, str]]
             ) -> Iterator[tuple[Item, ImageInfo]]:
    """Stage: decode each item once; yield (item, info) for good ones, append bad ones to
    ``skipped`` as {"source", "reason"}."""
    for item in items:
        try:
            info = probe(item.read())
        except (CorruptImageError, OSError) as e:
            skipped.append({"source": item.name, "reason": str(e)})
            continue
        yield item, info


def _build(src, tsrc, staging: Path, *, spec, val_frac, test_frac, seed, limit, shard_size,
           progress, label_map=None) -> dict[str, Any]:
    items = src.items
    if limit is not None:
        rng = np.random.default_rng([seed, _STREAM["subset"]])
        try:
            items = [items[i] for i in stratified_subset(src.labels, limit, seed=rng)]
        except SplitError as e:
            raise IngestError(str(e)) from None
    import torchvision.io  # noqa: F401  (a slow first import; keep it out of the progress bar)

    skipped: list[dict[str, str]] = []
    good = list(validate(_bar(items, progress, "validate"), skipped=skipped))
    test_good = []
    if tsrc is not None:
        test_good = _relabel(list(validate(_bar(tsrc.items, progress, "validate test"),
                                           skipped=skipped)), tsrc.classes, src.classes)
    if not good:
        raise SourceError(f"no readable image in {src.spec} ({len(skipped)} skipped, e.g. "
                          f"{skipped[0]['source'] if skipped else '-'})")
    image = _image_info([info for _, info in good + test_good])

    labels = np.array([it.label for it, _ in good], dtype=np.int64)
    try:
        parts = stratified_split(labels, val_frac=val_frac, test_frac=test_frac,
                                 seed=np.random.default_rng([seed, _STREAM["split"]]),
                                 classes=src.classes)
    except SplitError as e:
        raise IngestError(str(e)) from None
    members = {k: [good[i][0] for i in v] for k, v in parts.items()}
    if tsrc is not None:
        if not test_good:
            raise IngestError(f"test source {tsrc.spec} has no readable image")
        members["test"] = [it for it, _ in test_good]

    rows: dict[str, list] = {name: [] for name in SAMPLES.names}
    splits, realised = {}, {}
    total = sum(len(v) for v in members.values())
    bar = _bar(None, progress, "write shards", total=total)
    for si, split in enumerate(SPLITS):
        order = np.random.default_rng([seed, _STREAM["shuffle"], si]).permutation(len(members[split]))
        chosen = [members[split][i] for i in order]
        clean = np.array([it.label for it in chosen], dtype=np.int64)
        noisy_on = (spec.kind != "none" or label_map is not None) and split != "test"
        if label_map is not None and split != "test":  # the file's labels; the source's stay as truth
            train_labels = np.array([label_map[0][it.name] for it in chosen], dtype=np.int64)
        elif noisy_on:
            train_labels = inject_noise(clean, spec=spec, classes=src.classes,
                                        seed=np.random.default_rng([seed, _STREAM["noise"], si]))
        else:
            train_labels = clean
        realised[split] = float(np.mean(train_labels != clean)) if clean.size else 0.0
        samples = _samples(chosen, clean, train_labels, split=split, ext=image["ext"],
                           ground_truth=noisy_on, bar=bar)
        shards = write_shards(samples, folder=staging / "shards", split=split,
                              shard_size=shard_size)
        splits[split] = {"count": len(chosen), "shards": shards}
        n = len(chosen)
        rows["split"] += [split] * n
        rows["index"] += range(n)
        rows["key"] += [_key(split, i) for i in range(n)]
        rows["shard"] += [i // shard_size for i in range(n)]
        rows["source"] += [it.name for it in chosen]
        rows["label"] += train_labels.tolist()
        rows["true_label"] += clean.tolist()
        rows["noisy"] += (train_labels != clean).tolist()
    if bar is not None:
        bar.close()
    atomic_write_parquet(staging / "samples.parquet", pa.table(rows, schema=SAMPLES))
    return {
        "store_id": str(uuid.uuid4()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": src.spec, "test_source": tsrc.spec if tsrc else None,
        "classes": list(src.classes), "image": image, "splits": splits,
        "noise": _noise_doc(spec, realised, rows, src.classes, label_map),
        "seed": seed, "limit": limit, "val_frac": val_frac, "test_frac": test_frac,
        "shard_size": shard_size, "skipped": skipped, "versions": package_versions(),
    }


def _noise_doc(spec, realised, rows, classes, label_map) -> dict[str, Any]:
    if label_map is not None:
        # The file's disagreement with the source labels is the noise; it is what it is.
        info = label_map[1]
        return {"spec": f"labels:{Path(info['file']).name}", "kind": "labels", "rate": None,
                "labels_file": info["file"], "labels_sha256": info["sha256"],
                "realised": realised, "expected": dict(realised)}
    return {"spec": str(spec), "kind": spec.kind, "rate": spec.rate, "realised": realised,
            "expected": {s: expected_rate(np.array(rows["true_label"])[
                np.array(rows["split"]) == s], spec=spec, classes=classes)
                if s != "test" else 0.0 for s in SPLITS}}


def _samples(items: list[Item], clean: np.ndarray, labels: np.ndarray, *, split: str,
             ext: str, ground_truth: bool, bar) -> Iterator[dict[str, Any]]:
    for i, (item, y, z) in enumerate(zip(items, clean.tolist(), labels.tolist())):
        meta = {"index": i, "label": z}
        if ground_truth:
            meta.update(true_label=y, noisy=y != z)
        if bar is not None:
            bar.update(1)
        yield {"__key__": _key(split, i), ext: item.read(), "cls": str(z).encode(),
               "json": json.dumps(meta).encode()}


def _key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def _relabel(pairs, test_classes: list[str], classes: list[str]):
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise IngestError(f"test source has classes not in the training source: "
                          f"{', '.join(unknown[:10])}; both must use the same class names")
    index = {name: i for i, name in enumerate(classes)}
    return [(it._replace(label=index[test_classes[it.label]]), info)
            for it, info in pairs]


def _image_info(infos: list[ImageInfo]) -> dict[str, Any]:
    exts = {info.ext for info in infos}
    if len(exts) > 1:
        counts = {e: sum(info.ext == e for info in infos) for e in sorted(exts)}
        raise IngestError(f"the source mixes image formats ({counts}); a store holds one "
                          "format, so convert the files to all-JPEG or all-PNG first")
    sizes = {(info.height, info.width) for info in infos}
    (height, width), = sizes if len(sizes) == 1 else {(None, None)}
    return {"ext": exts.pop(), "channels": 1 if all(i.channels == 1 for i in infos) else 3,
            "height": height, "width": width}


def _check_store(layout: StoreLayout, overwrite: bool, *, clean: bool = False) -> None:
    """Refuse a folder that is not a store, or a store with data unless ``overwrite``.

    The leftovers of an ingest killed inside its commit (``_leftovers``) count as no data;
    with ``clean`` (only under the ingest lock) they are removed.
    """
    if not layout.root.exists():
        return
    if not layout.root.is_dir():
        raise StoreError(f"--store {layout.root} exists and is not a folder")
    entries = sorted(p.name for p in layout.root.iterdir()
                     if not p.name.startswith((".tmp-", ".lock-")))
    if not entries:
        return
    foreign = [e for e in entries if e not in STORE_ENTRIES]
    if foreign:
        raise StoreError(f"{layout.root} holds files that are not part of a store "
                         f"({', '.join(foreign[:5])}); choose an empty or new --store folder")
    if _leftovers(layout, entries):
        if clean:
            log.warning("%s: removing %s left by an ingest that stopped before writing "
                        "manifest.json", layout.root, " and ".join(entries))
            for name in entries:
                path = layout.root / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    if not overwrite:
        raise StoreError(f"store {layout.root} already holds data ({', '.join(entries)}); "
                         "pass --overwrite (overwrite=True from Python) to replace it (its "
                         "features, runs and searches go too) or choose another store")


def _sweep_staging(layout: StoreLayout) -> None:
    """Remove the staging folder of an ingest killed after its commit but before its cleanup.

    The store is complete then, so the next ingest is refused; without this sweep the refused
    rerun would leave the dead staging folder (a full copy of the shards) behind for good. Only
    under the ingest lock: a live ingest's staging folder looks the same.
    """
    if not layout.root.is_dir():
        return
    with contextlib.suppress(LockedError, OSError):
        with exclusive_lock(layout.lock("ingest"), f"store {layout.root}"):
            remove_stale_temporaries(layout.root, recursive=False)


def _leftovers(layout: StoreLayout, entries: list[str]) -> bool:
    """True when ``entries`` (the store's, temporaries aside) are what ``_commit`` killed after
    moving the new data in but before writing the manifest leaves: no manifest.json, only
    ``shards/`` (holding only shard files) and ``samples.parquet``."""
    if not set(entries) <= set(LEFTOVER_ENTRIES):
        return False
    if layout.samples.exists() and not layout.samples.is_file():
        return False
    if not layout.shards_dir.exists():
        return True
    return layout.shards_dir.is_dir() and all(
        _SHARD_FILE.fullmatch(p.name) or p.name.startswith(".tmp-")
        for p in layout.shards_dir.iterdir())


def _commit(layout: StoreLayout, staging: Path, manifest: dict[str, Any]) -> None:
    """Swap the complete staging content into the store; manifest last."""
    old = [layout.root / e for e in STORE_ENTRIES if (layout.root / e).exists()]
    trash = layout.root / f".tmp-old-{uuid.uuid4().hex[:12]}"
    moved: list[str] = []
    try:
        if old:
            trash.mkdir()
            # The old manifest goes first: from here the store reads as incomplete until the
            # new manifest lands, so no reader mixes old and new files.
            for path in sorted(old, key=lambda p: p.name != "manifest.json"):
                os.replace(path, trash / path.name)
                moved.append(path.name)
        os.replace(staging / "shards", layout.shards_dir)
        os.replace(staging / "samples.parquet", layout.samples)
        write_manifest(layout, manifest)
    except BaseException:
        # Put the old store back rather than leave both old and new data to be cleaned up.
        if not layout.manifest.exists():
            for target in (layout.shards_dir, layout.samples):
                if target.exists() and not (staging / target.name).exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            for name in sorted(moved, key=lambda n: n == "manifest.json"):
                os.replace(trash / name, layout.root / name)
            with contextlib.suppress(OSError):
                trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _remove_if_only_lock(layout: StoreLayout) -> None:
    with contextlib.suppress(OSError):
        if all(p.name.startswith(".lock-") for p in layout.root.iterdir()):
            for p in layout.root.iterdir():
                p.unlink()
            layout.root.rmdir()


def _bar(items, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return items
    from tqdm.auto import tqdm

    if items is None:
        return tqdm(total=total, desc=desc, unit="img", leave=False)
    return tqdm(items, desc=desc, unit="img", leave=False)
