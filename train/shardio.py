"""Shard-level stages of the loader: plan which shards (or samples) each worker reads, and
read tar members fast.

Planning follows timm's ``reader_wds.py``: shards are shuffled with an RNG seeded by
``(seed, epoch)`` (identical on every rank, so the split stays a partition), then split by
global worker id ``rank * num_workers + worker``. When a split has fewer shards than global
workers, every worker reads all shards and keeps every ``G``-th sample instead (sample
splitting): reading a tar is cheap next to decoding it, and each sample still goes to exactly
one worker.

Reading: store shards are plain ustar tars (``pipeline.shards``), so members are parsed straight
from their 512-byte headers (about 10x faster than ``tarfile``'s streaming mode, which was the
loader's bottleneck); the output is the stream of ``{"fname", "data", "__url__"}`` dicts plus an
end-of-shard ``{}`` that ``webdataset.tariterators.group_by_keys`` expects. A damaged header
(bad checksum, truncated member) ends that shard with a logged, counted error instead of a
crash mid-epoch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)
BLOCK = 512


class Shard(NamedTuple):
    path: str
    count: int


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


def read_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Regular members of one ustar tar as ``{"fname", "data", "__url__"}``; ``{}`` at the end.

    Raises:
        ShardReadError: on a bad header checksum or a truncated member.
    """
    url = str(path)
    with open(path, "rb") as f:
        buf = f.read()
    pos, end = 0, len(buf)
    long_name = None
    while pos + BLOCK <= end:
        h = buf[pos : pos + BLOCK]
        if h[0] == 0:  # end-of-archive marker
            break
        if not _checksum_ok(h):
            raise ShardReadError(f"{url}: bad tar header at byte {pos}")
        size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = h[156:157]
        pos += BLOCK
        if pos + size > end:
            raise ShardReadError(f"{url}: member truncated at byte {pos}")
        if kind == b"L":  # GNU long name: the next member's name is this member's data
            long_name = buf[pos : pos + size].split(b"\0", 1)[0].decode("utf-8")
        elif kind in (b"0", b"\0"):
            name = long_name or _name(h)
            long_name = None
            yield {"fname": name, "data": buf[pos : pos + size], "__url__": url}
        pos += -(-size // BLOCK) * BLOCK
    yield {}


def _name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8") if h[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _checksum_ok(h: bytes) -> bool:
    try:
        stored = int(h[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(h) - sum(h[148:156]) + 8 * 32


class ShardReadError(OSError):
    """A shard's bytes are not a readable tar (beyond this point)."""


def group_members(members: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Stage: members -> WebDataset samples ``{"__key__", "__url__", ext: bytes}``.

    The same grouping as ``webdataset.tariterators.group_by_keys`` (consecutive members sharing
    the part of the base name before its first dot; ``{}`` ends a shard), without its per-member
    regular expression, which cost as much as reading the tar.
    """
    current: dict[str, Any] | None = None
    for m in members:
        if not m:
            if current is not None:
                yield current
            current = None
            continue
        name = m["fname"]
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot < 0:
            continue
        key, ext = name[:dot], name[dot + 1 :].lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": m["__url__"]}
        current[ext] = m["data"]
    if current is not None:
        yield current


def read_shards(src: Iterable[Shard], *, errors: list[str]) -> Iterator[dict[str, Any]]:
    """Stage: WebDataset samples of each shard in turn. A damaged shard is logged, noted in
    ``errors`` and ended early (the samples before the damage are kept, the rest skipped)."""
    for shard in src:
        members = read_tar(shard.path)
        try:
            yield from group_members(members)
        except (ShardReadError, OSError) as e:
            log.warning("skipping the rest of shard %s: %s", shard.path, e)
            errors.append(f"{Path(shard.path).name}: {e}")


def take_every(src: Iterable[Any], *, stride: int, offset: int) -> Iterator[Any]:
    """Stage: items ``offset, offset + stride, ...`` of ``src`` (sample splitting)."""
    if stride == 1:
        yield from src
        return
    for i, x in enumerate(src):
        if i % stride == offset:
            yield x
