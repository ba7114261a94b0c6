"""build-features: score K crops of every training image with a frozen model.

The stage is a chain of generators, one job each:
``read_shard`` (tar -> index, label, image) -> ``make_crops`` (-> K crops) -> ``batch_crops``
(-> tensors), all in ``pipeline.features.crop_stream`` -> scoring (``pipeline.features.scoring``) -> one Parquet
part per shard (here).

Invariants:
- crop 0 of image ``i`` is ``plain_crop``; crops ``1..K-1`` come from a generator seeded by
  ``(seed, i)`` alone, so rows never depend on rank, shard order or batch size;
- ``features/part-{shard:06d}.parquet`` is written atomically, by rank ``shard % world_size``,
  and carries its provenance (store, checkpoint, K, grad-norm mode, seed) as schema metadata;
  a part that exists is complete, so a killed run resumes by skipping it;
- a part whose scores are not all finite is never written: those crops are counted and the run
  fails at the end naming them (the sampler needs every row, so skipping them is not an option);
- ``features.json`` (``done: true``) is written last, by rank 0, after checking that the
  parts hold exactly N x K rows with unique ``(index, crop)``;
- replacing features (``overwrite``) writes the new parts beside the old ones, in
  ``STORE/.features-new``, and swaps them in only once all are written and checked: a run that
  fails on the way leaves the old features, ``features.json`` and tables as they were.
Only ``index``, the training label and the image are read from a shard: never the ground truth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from swift_sampler.storage import (
    QueryError,
    StoreError,
    StoreLayout,
    atomic_write_json,
    atomic_write_parquet,
    exclusive_lock,
    literal,
    num_classes,
    package_versions,
    query,
    read_features_meta,
    read_manifest,
    remove_stale_temporaries,
    split_shards,
)
from swift_sampler.storage.arguments import check_call
from swift_sampler.storage.errors import UsageError
from swift_sampler.storage.schemas import FEATURES

from ..ingest.shards import shard_infos
from .crop_stream import (
    ShardCrops,
    batch_crops,
    crops_for,
    iter_shard_batches,
    make_crops,
    output_size,
    read_shard,
)
from .scoring import GRAD_NORM_MODES, score_batch

# The crop-stream stages are re-exported: build-features callers (benchmarks, notebooks) find
# the whole stage here.
__all__ = ["DamagedPartError", "NonFiniteScoreError", "ShardCrops", "batch_crops", "build_features", "crops_for",
           "iter_shard_batches", "make_crops", "output_size", "part_provenance", "provenance",
           "read_features_meta", "read_shard", "score_rows", "state_dict_sha256"]

log = logging.getLogger(__name__)
PROVENANCE_KEY = b"swift_sampler.features"
PROVENANCE_FIELDS = ("store_id", "checkpoint_sha256", "crops_per_image", "grad_norm", "seed")
STAGING = ".features-new"  # in the store: the parts of an overwrite until they are swapped in


class NonFiniteScoreError(StoreError):
    """The model produced NaN or infinite scores; nothing was written for those shards."""


def provenance(manifest: dict, model: nn.Module, *, checkpoint_sha256: str | None,
               crops_per_image: int, grad_norm: str, seed: int) -> dict[str, Any]:
    """What makes two feature parts comparable. Without a checkpoint file the model's
    state-dict digest stands in for its checksum."""
    return {"store_id": manifest["store_id"],
            "checkpoint_sha256": checkpoint_sha256 or "state_dict:" + state_dict_sha256(model),
            "crops_per_image": int(crops_per_image), "grad_norm": grad_norm, "seed": int(seed)}


def state_dict_sha256(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DamagedPartError(StoreError):
    """A feature part that is not a readable Parquet file (parts are written atomically, so
    only damage from outside the pipeline leads here)."""


def part_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance a part was written with, or None for a part without one.

    Raises:
        DamagedPartError: the file is not readable Parquet (e.g. cut short), naming it.
    """
    try:
        meta = pq.read_schema(path).metadata or {}
        raw = meta.get(PROVENANCE_KEY)
        return json.loads(raw) if raw else None
    except (pa.ArrowException, OSError, ValueError) as e:  # ArrowInvalid and JSON errors too
        raise DamagedPartError(f"{path} is not a readable feature part ({e})") from None




def score_rows(batch: dict[str, Any], model: nn.Module, *, grad_norm: str,
               device: torch.device) -> dict[str, np.ndarray]:
    """Score one batch of ``batch_crops``; return its rows as NumPy columns of ``FEATURES``."""
    x = batch["x"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device, non_blocking=True)
    scores = score_batch(model, x, labels, grad_norm=grad_norm, autocast=device.type == "cuda")
    crops = batch["crops"].numpy()
    cols = {"index": batch["index"].numpy(), "crop": batch["crop"].numpy(), "label": batch["label"].numpy()}
    for j, name in enumerate(("top", "left", "height", "width", "flip")):
        cols[name] = crops[:, j]
    for name in ("loss", "entropy_r", "grad_norm"):
        cols[name] = scores[name].float().cpu().numpy()
    return cols


def assemble(batches: list[dict[str, np.ndarray]]) -> pa.Table:
    """Rows of several scored batches as one table (schema ``FEATURES``, sorted by index, crop)."""
    arrays = [pa.array(np.concatenate([b[f.name] for b in batches]).astype(f.type.to_pandas_dtype()))
              for f in FEATURES]
    table = pa.Table.from_arrays(arrays, schema=FEATURES)
    return table.sort_by([("index", "ascending"), ("crop", "ascending")])


def _check_model(model: nn.Module, manifest: dict) -> None:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not callable(getattr(model, "features", None)):
        raise ValueError("the model must have .features(x) -> (B, D) and a linear .head (train.models "
                         "contract): pass it through swift_sampler.train.models.as_classifier, or "
                         "call swift_sampler.build_features, which does")
    if head.out_features != num_classes(manifest):
        raise StoreError(
            f"the checkpoint predicts {head.out_features} classes but the store has "
            f"{num_classes(manifest)} ({', '.join(map(str, manifest['classes'][:5]))}...): "
            "use a checkpoint trained on this store")


def _prepare(layout: StoreLayout, prov: dict, overwrite: bool) -> Path:
    """Refuse features from another checkpoint/config unless ``overwrite``; clean temporaries;
    return the folder the parts go to: ``features/``, or the staging folder when they replace
    features of another provenance (nothing of the old ones is touched before the swap).

    A part that is not readable Parquet is deleted (with a warning naming it), so it is scored
    again: parts are written atomically, so it can only be damage from outside.
    """
    remove_stale_temporaries(layout.features_dir)
    staging = layout.root / STAGING
    clash = None
    if layout.features_meta.is_file():
        old = read_features_meta(layout)
        if {k: old.get(k) for k in PROVENANCE_FIELDS} != prov:
            clash = f"{layout.features_meta.name} ({_diff(old, prov)})"
    damaged: list[Path] = []
    for part in layout.feature_parts():
        if clash:
            break
        try:
            old = part_provenance(part)
        except DamagedPartError as e:
            damaged.append(part)
            log.warning("%s; deleting it to score its shard again", e)
            continue
        if old != prov:
            clash = f"{part.name} ({_diff(old or {}, prov)})"
    if clash and not overwrite:
        raise StoreError(
            f"{layout.features_dir} holds features from another checkpoint or configuration: "
            f"{clash}; pass overwrite=True (--overwrite) to replace them")
    if clash:
        return _staged(staging, prov)
    # Nothing to replace: parts staged by an earlier overwrite are of features no longer asked for.
    shutil.rmtree(staging, ignore_errors=True)
    if damaged:
        # features.json vouches for every part: it goes first, and is rewritten at the end.
        layout.features_meta.unlink(missing_ok=True)
    for part in damaged:
        part.unlink()
    return layout.features_dir


def _staged(staging: Path, prov: dict) -> Path:
    """``staging``, holding only whole parts of ``prov``: those of a failed or killed overwrite
    with the same provenance are kept, so its rerun does not score them again."""
    staging.mkdir(exist_ok=True)
    remove_stale_temporaries(staging)
    for part in sorted(staging.glob("part-*.parquet")):
        try:
            own = part_provenance(part) == prov
        except DamagedPartError:
            own = False
        if not own:
            part.unlink()
    return staging


def _swap_in(layout: StoreLayout, staging: Path) -> None:
    """Replace the parts of ``features/`` by the checked parts of ``staging``.

    ``features.json`` goes first (it vouches for the parts; ``_finish`` writes it anew). A kill
    halfway leaves old and new parts without it: a rerun with ``overwrite`` sees the old ones
    clash, scores what left the staging folder again and swaps once more.
    """
    layout.features_meta.unlink(missing_ok=True)
    layout.features_dir.mkdir(exist_ok=True)
    new = sorted(p.name for p in staging.glob("part-*.parquet"))
    for part in layout.feature_parts():
        if part.name not in new:
            part.unlink()
    for name in new:
        os.replace(staging / name, layout.features_dir / name)
    shutil.rmtree(staging)


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} != {new[k]!r}" for k in PROVENANCE_FIELDS if old.get(k) != new[k])


def _dist():
    from ..process_group import process_group

    return process_group()


def _agree(rank: int, error: BaseException | None, folder: Path | None) -> Path:
    """Rank 0's setup outcome reaches every rank: all raise if it failed, else all write their
    parts into rank 0's ``folder``."""
    dist = _dist()
    if dist is not None:
        box = [None if error is None else f"{type(error).__name__}: {error}", folder]
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[0]:
            raise StoreError(f"rank 0 failed to start build-features: {box[0]}")
        folder = box[1]
    if error is not None:
        raise error
    return folder


def build_features(store, model: nn.Module, *, crops_per_image: int = 8, grad_norm: str = "last-layer",
                   seed: int = 0, batch_size: int = 512, rank: int = 0, world_size: int = 1,
                   checkpoint_sha256: str | None = None, overwrite: bool = False,
                   image_size: int | None = None, device: str | torch.device | None = None,
                   quantiles: int | None = None, angles: int | None = None, tables: bool = True,
                   workers: int | None = None, progress: bool = True,
                   on_part: Callable[[int, Path], None] | None = None) -> dict:
    """Score K crops of every training image; write ``features/part-*.parquet`` and ``features.json``.

    Args:
        store: store directory (ingested).
        model: frozen classifier with ``.features`` and a linear ``.head`` whose class count
            matches the store; put in eval mode (and moved to ``device``) here.
        crops_per_image: K >= 1; crop 0 is the plain view.
        grad_norm: ``"last-layer"`` (exact for the head, nearly free) or ``"full"`` (exact over
            every parameter, slow).
        seed: crops 1..K-1 of image i come from ``np.random.default_rng((seed, i))``.
        rank, world_size: this process's share: shard s is scored by rank ``s % world_size``.
            With ``world_size > 1`` a ``torch.distributed`` group must be initialised.
        checkpoint_sha256: checksum of the checkpoint file, recorded for provenance.
        overwrite: replace features from another checkpoint or configuration instead of refusing
            (the new parts are written beside the old ones and swapped in once all are checked).
        image_size: model input size (default ``model.image_size``); crops are resized to it
            unless they are pad crops of images of exactly that size.
        quantiles, angles: passed to ``pipeline.sampler.table_store.build_store_tables`` when ``tables``.
        workers: decoding/cropping processes (default: one per spare CPU core, at most 8;
            0 decodes in this process).
        on_part: called as ``on_part(shard, path)`` after each part is written.

    Returns:
        a summary dict (rows, parts written/skipped, crops/s, ...); on rank 0 only, ``done``.

    Raises:
        StoreError: no train shards, class-count mismatch, features of another provenance,
            a shard that does not match the manifest; ``NonFiniteScoreError`` for NaN/inf scores.
    """
    check_call(build_features, locals())
    t0 = time.perf_counter()
    layout = StoreLayout(store).require()
    manifest = read_manifest(layout)
    shards = split_shards(layout, manifest, "train")
    checks = shard_infos(layout, manifest, "train")  # size and sha256 of each shard
    if crops_per_image < 1 or batch_size < 1:
        raise UsageError("crops_per_image and batch_size must be at least 1")
    if grad_norm not in GRAD_NORM_MODES:
        raise UsageError(f"grad_norm must be one of {', '.join(GRAD_NORM_MODES)}, got {grad_norm!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if world_size > 1 and _dist() is None:
        raise ValueError("world_size > 1 needs an initialised torch.distributed process group")
    _check_model(model, manifest)
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    channels = int((manifest.get("image") or {}).get("channels", 3))
    out_size = output_size(manifest, image_size or getattr(model, "image_size", None))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval().to(device).to(memory_format=torch.channels_last)
    prov = provenance(manifest, model, checkpoint_sha256=checkpoint_sha256,
                      crops_per_image=crops_per_image, grad_norm=grad_norm, seed=seed)
    meta = {PROVENANCE_KEY: json.dumps(prov, sort_keys=True).encode()}

    with contextlib.ExitStack() as stack:
        error, folder = None, None
        if rank == 0:
            try:
                stack.enter_context(exclusive_lock(layout.lock("features"), "build-features"))
                folder = _prepare(layout, prov, overwrite)
            except Exception as e:
                error = e
        folder = _agree(rank, error, folder)

        mine = [(s, p, n) for s, (p, n) in enumerate(shards) if s % world_size == rank]
        todo = [(s, p, n) for s, p, n in mine if not _part(folder, s).is_file()]
        bar = _progress(sum(n for _, _, n in todo) * crops_per_image, progress and rank == 0)
        bad: list[tuple[int, int, list[int]]] = []  # (shard, crops, indices)
        counts = {s: n for s, _, n in todo}
        pending: dict[int, list[dict[str, np.ndarray]]] = {s: [] for s, _, _ in todo}
        scored, t_score = 0, time.perf_counter()
        batches = iter_shard_batches([(s, checks[s]) for s, _, _ in todo], workers=workers, channels=channels,
                                     crops_per_image=crops_per_image, seed=seed, out_size=out_size,
                                     batch_size=batch_size)
        for batch in batches:
            s = batch["shard"]
            if not batch["end"]:
                pending[s].append(score_rows(batch, model, grad_norm=grad_norm, device=device))
                bar.update(len(batch["x"]))
                continue
            table = assemble(pending.pop(s)) if pending[s] else FEATURES.empty_table()
            scored += table.num_rows
            problem = _check_part(table, counts[s] * crops_per_image, manifest, shards[s][0])
            if problem is not None:
                bad.append((s, *problem))
                log.error("shard %d: %d crops with non-finite scores; part not written", s, problem[0])
                continue
            atomic_write_parquet(_part(folder, s), table.replace_schema_metadata(meta))
            if on_part:
                on_part(s, _part(folder, s))
        bar.close()
        seconds = time.perf_counter() - t_score

        dist = _dist()
        counts = [len(todo), len(mine) - len(todo), scored]
        if dist is not None:
            everyone: list = [None] * world_size
            dist.all_gather_object(everyone, (bad, counts))
            bad = [b for rank_bad, _ in everyone for b in rank_bad]
            # The summary counts every rank's parts, not rank 0's alone.
            counts = [sum(c[i] for _, c in everyone) for i in range(3)]
            dist.barrier()
        if bad:
            crops = sum(c for _, c, _ in bad)
            indices = sorted(i for _, _, idx in bad for i in idx)
            raise NonFiniteScoreError(
                f"{crops} crops of {len(indices)} images had NaN or infinite scores (indices "
                f"{indices[:20]}{' ...' if len(indices) > 20 else ''}); their shards "
                f"{sorted(s for s, _, _ in bad)} were not written. The checkpoint is probably "
                "diverged: check it, then run again (finished shards are kept)")
        summary = {"store": str(layout.root), "rank": rank, "world_size": world_size,
                   "parts_written": counts[0], "parts_skipped": counts[1],
                   "crops_scored": counts[2], "crops_per_s": counts[2] / seconds if seconds > 0 else None,
                   "grad_norm": grad_norm, "crops_per_image": crops_per_image}
        if rank != 0:
            return summary
        summary.update(_finish(layout, folder, shards, prov))
        if tables:
            summary["tables"] = _build_tables(layout, quantiles=quantiles, angles=angles)
        summary["seconds"] = time.perf_counter() - t0
        return summary


def _part(folder: Path, shard: int) -> Path:
    return folder / f"part-{shard:06d}.parquet"


def _check_part(table: pa.Table, rows: int, manifest: dict, path: Path) -> tuple[int, list[int]] | None:
    """Raise on a shard that does not match the manifest; return (crops, indices) of
    non-finite scores, or None when every score is finite."""
    if table.num_rows != rows:
        raise StoreError(f"{path.name} yields {table.num_rows} crops, expected {rows} from the "
                         "manifest's sample count; the shard is damaged, re-run ingest")
    labels = table["label"].to_numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes(manifest)):
        raise StoreError(f"{path.name}: labels outside 0..{num_classes(manifest) - 1}; re-run ingest")
    finite = np.ones(table.num_rows, bool)
    for name in ("loss", "entropy_r", "grad_norm"):
        finite &= np.isfinite(table[name].to_numpy())
    if finite.all():
        return None
    return int((~finite).sum()), np.unique(table["index"].to_numpy()[~finite]).tolist()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="crop", unit_scale=True, desc="build-features", disable=not enabled)


def _finish(layout: StoreLayout, folder: Path, shards: list, prov: dict) -> dict:
    """Check the union of the parts in ``folder`` (N x K rows, unique (index, crop)), swap them
    into ``features/`` when they were staged, then write features.json."""
    parts = [_part(folder, s) for s in range(len(shards))]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise StoreError(f"feature parts missing after the run: {', '.join(missing[:5])}; run again to resume")
    k = prov["crops_per_image"]
    n = sum(count for _, count in shards)
    # Through the store's DuckDB catalog, with the glob of its feature_parts view: exactly the
    # rows a user's SQL and the later stages will see once the parts are in features/.
    glob = literal(str(folder / "part-*.parquet"))
    try:
        ids = query(layout.root, f'SELECT "index", crop FROM read_parquet({glob})')
    except QueryError as e:
        raise DamagedPartError(f"{folder} holds a part that is not readable ({e}); "
                               "delete it and run build-features again to score its shard "
                               "again") from None
    keys = ids["index"].to_numpy().astype(np.int64) * k + ids["crop"].to_numpy()
    if len(keys) != n * k or len(np.unique(keys)) != len(keys):
        raise StoreError(f"feature parts hold {len(keys)} rows ({len(np.unique(keys))} unique "
                         f"(index, crop)), expected {n} x {k}; rerun with --overwrite")
    if folder != layout.features_dir:
        _swap_in(layout, folder)
    info = {**prov, "images": n, "rows": n * k, "parts": len(parts), "done": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": package_versions()}
    atomic_write_json(layout.features_meta, info)
    return {"images": n, "rows": n * k, "done": True}


def _build_tables(layout: StoreLayout, *, quantiles: int | None, angles: int | None) -> dict:
    from ..sampler.table_store import build_store_tables

    kwargs = {k: v for k, v in (("quantiles", quantiles), ("angles", angles)) if v is not None}
    return build_store_tables(layout.root, **kwargs)
