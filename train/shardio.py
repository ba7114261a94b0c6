"""Shard-level stages of the loader: plan which shards (or samples) each worker reads, and
read them.

Planning follows timm's ``reader_wds.py``: shards are shuffled with an RNG seeded by
``(seed, epoch)`` (identical on every rank, so the split stays a partition), then split by
global worker id ``rank * num_workers + worker``. When a split has fewer shards than global
workers, every worker reads all shards and keeps every ``G``-th sample instead (sample
splitting): reading a tar is cheap next to decoding it, and each sample still goes to exactly
one worker.

Reading: ``pipeline.ingest.shards.read_tar`` and ``group_members`` (the one fast ustar parser, also
used by build-features; re-exported here). A damaged shard (bad header checksum, truncated
member) ends early with a logged, counted error instead of a crash mid-epoch. A shard that
reads as a whole tar but whose size or sha256 differs from the manifest was changed after
ingest: its samples look valid and may be wrong, so ``ShardChecksumError`` stops training.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from swift_sampler.pipeline.ingest.shards import (
    ShardChecksumError,
    ShardReadError,
    group_members,
    read_tar,
)

__all__ = ["Shard", "ShardChecksumError", "ShardReadError", "WorkerPlan", "group_members", "plan_worker", "python_rng",
           "read_shards", "read_tar", "seed_ints", "take_every"]

log = logging.getLogger(__name__)


class Shard(NamedTuple):
    """A shard as the manifest lists it; ``bytes``/``sha256`` None: not checked."""

    path: str
    count: int
    bytes: int | None = None
    sha256: str | None = None


class WorkerPlan(NamedTuple):
    """What one global worker reads in one pass: ``shards`` in order, and of their samples the
    ones at positions ``offset, offset + stride, ...`` (``stride = 1`` when splitting by shard)."""

    shards: list[Shard]
    stride: int
    offset: int

    @property
    def count(self) -> int:
        total = sum(s.count for s in self.shards)
        return len(range(self.offset, total, self.stride))


def seed_ints(*parts: int) -> np.random.SeedSequence:
    """One SeedSequence per tuple of non-negative ints (seed, epoch, rank, worker, ...)."""
    return np.random.SeedSequence([int(p) for p in parts])


def python_rng(*parts: int) -> random.Random:
    return random.Random(int(seed_ints(*parts).generate_state(1, np.uint64)[0]))


def plan_worker(shards: Sequence[Shard], *, seed: int, epoch: int, rank: int, world_size: int,
                worker: int, num_workers: int, shuffle: bool, repeat: int = 0) -> WorkerPlan:
    """Shards (and sample stride) for global worker ``rank * num_workers + worker``.

    ``repeat`` numbers extra passes within one epoch (a worker whose share runs short of its
    quota reads its shards again, in a new order).
    """
    order = list(shards)
    if shuffle:
        python_rng(seed, epoch, repeat, 0x5A4D).shuffle(order)
    total = world_size * num_workers
    gid = rank * num_workers + worker
    if len(order) >= total:
        return WorkerPlan(order[gid::total], 1, 0)
    return WorkerPlan(order, total, gid)


def read_shards(src: Iterable[Shard], *, errors: list[str],
                damaged: Callable[[dict[str, Any]], bool] | None = None,
                skip_damaged: bool = False, stride: int = 1, offset: int = 0,
                reported: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stage: WebDataset samples of each shard in turn.

    A damaged shard (a tar that does not read to its end) stops the stage with
    ``ShardReadError`` naming the shard and how many of its samples cannot be read: a result
    computed on part of the data must not look like a whole one. With
    ``skip_damaged`` it is logged instead and one entry per lost sample (of this reader's share:
    ``stride``/``offset`` of sample splitting) goes into ``errors``, so the run's summary counts
    the samples lost, not the errors; ``reported`` (shared across passes) keeps a shard read
    twice in one epoch from counting its losses twice.

    A whole tar holding another number of samples than the manifest lists stops the stage
    before its first sample, ``skip_damaged`` or not: the epoch's quota comes from the
    manifest, so a count too low would silently leave samples out of every epoch.

    A shard whose bytes differ from the manifest (size or sha256, checked on the bytes read
    anyway) is read only when the difference shows as damage the later stages skip by key:
    ``damaged(sample)`` true for some sample of it (e.g. an image that does not decode).
    Otherwise the change cannot be told from valid data, so it stops training.

    Raises:
        ShardChecksumError: a shard that is a readable tar, differs from the manifest and in
            which ``damaged`` (None: nothing) finds no damaged sample; before any of its
            samples is yielded.
        ShardReadError: a damaged shard, unless ``skip_damaged``.
        StoreError: a whole shard whose sample count differs from the manifest's.
    """
    position = 0  # samples of the earlier shards of this plan, as the manifest counts them
    for shard in src:
        read = 0
        try:
            try:
                for sample in group_members(read_tar(shard.path, sha256=shard.sha256, size=shard.bytes,
                                                     count=shard.count)):
                    read += 1
                    yield sample
            except ShardChecksumError as e:  # raised before the first member
                if damaged is None or not any(damaged(s) for s in group_members(read_tar(shard.path))):
                    raise
                log.warning("%s; reading it on because the change shows as damaged samples, "
                            "which are skipped", e)
                for sample in group_members(read_tar(shard.path, count=shard.count)):
                    read += 1
                    yield sample
        except OSError as e:  # ShardReadError included
            name = Path(shard.path).name
            lost = [p for p in range(position + read, position + shard.count) if p % stride == offset]
            if not skip_damaged:
                raise ShardReadError(
                    f"shard {name} is damaged ({e}): {shard.count - read} of its {shard.count} "
                    "samples cannot be read; ingest the store again, or pass --skip-damaged to "
                    "go on without them (the summary then counts the samples lost)") from None
            log.warning("skipping the rest of shard %s (%d samples lost): %s", shard.path,
                        len(lost), e)
            entries = [f"{name}: sample {p - position} lost" for p in lost]
            if reported is not None:
                entries = [x for x in entries if x not in reported]
                reported.update(entries)
            errors.extend(entries)
        position += shard.count


def take_every(src: Iterable[Any], *, stride: int, offset: int) -> Iterator[Any]:
    """Stage: items ``offset, offset + stride, ...`` of ``src`` (sample splitting)."""
    if stride == 1:
        yield from src
        return
    for i, x in enumerate(src):
        if i % stride == offset:
            yield x
