"""WebDataset shards: a small, deterministic tar writer and the one fast tar reader.

A shard is a plain POSIX (ustar) tar: per sample ``KEY.jpg|png``, ``KEY.cls``, ``KEY.json``,
in that order, so ``webdataset.WebDataset``, ``tar`` and ``tarfile`` all read it. Headers use
a fixed mode, owner and mtime (0): the same samples always give the same bytes, hence the
same sha256. Each shard is written through ``storage.atomic_writer`` and hashed while it is
written (no second read).

Size: a tar member costs a 512-byte header plus its data rounded up to 512 bytes, so one
sample costs ``3 * 512 + 512 * ceil(image / 512) + 1024`` bytes; a 0.9 kB CIFAR JPEG becomes
3.5 kB on disk (about 3.9x). That is the price of a layout every WebDataset reader accepts.

Reading (build-features, the training loader, ``iter_split``) goes through one parser,
``read_tar`` -> ``group_members``: the headers are parsed directly (about 10x faster than
``tarfile``) and every header checksum is checked. Damage raises ``ShardReadError`` naming
the shard; the loader catches it and skips the rest of that shard (counted and logged),
every other caller stops.

Given the manifest's ``sha256`` and ``bytes`` of a shard, ``read_tar`` also compares them with
the bytes it has read anyway (one hashlib pass over memory, small next to decoding). A shard
whose tar structure is damaged is reported as ``ShardReadError`` as above; a shard that parses
but whose bytes differ from the manifest was edited or replaced after ingest, so no sample in
it can be trusted and every caller stops (``ShardChecksumError``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tarfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from swift_sampler.storage import (
    StoreError,
    StoreLayout,
    atomic_writer,
    read_manifest,
    split_shards,
)
from swift_sampler.storage.errors import UsageError

BLOCK = 512
IMAGE_EXTS = ("jpg", "png")


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.uname, info.gname = 0o644, 0, "", ""
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[124:136] = bytes(12)
    return bytes(header)


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)


def tar_header(name: str, size: int) -> bytes:
    """ustar header of a regular file (byte-identical to ``tarfile``'s for the same fields)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(_TEMPLATE)
    h[0:len(raw)] = raw
    size_field = b"%011o\0" % size
    h[124:136] = size_field
    # Only the name and size differ from the template, so the checksum is a cheap update.
    chk = _TEMPLATE_SUM + sum(raw) + sum(size_field)
    h[148:155] = b"%06o\0" % chk
    return bytes(h)


class TarWriter:
    """Append members to a binary file object; counts and hashes every byte written."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def add(self, name: str, data: bytes) -> None:
        pad = -len(data) % BLOCK
        self._write(tar_header(name, len(data)) + data + bytes(pad))

    def add_sample(self, sample: dict[str, Any]) -> None:
        """``sample``: ``__key__`` plus extension -> bytes, written in insertion order."""
        key = sample["__key__"]
        parts = []
        for ext, data in sample.items():
            if ext != "__key__":
                parts += [tar_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % BLOCK)]
        self._write(b"".join(parts))

    def close(self) -> None:
        self._write(bytes(2 * BLOCK))  # end-of-archive marker

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)


def write_shards(src: Iterable[dict[str, Any]], *, folder: str | Path, split: str,
                 shard_size: int = 5000) -> list[dict[str, Any]]:
    """Final stage: write samples to ``folder/{split}-%06d.tar``, ``shard_size`` per shard.

    Each shard appears atomically. Returns the manifest entries
    ``[{"file", "count", "bytes", "sha256"}]`` in shard order.
    """
    if shard_size < 1:
        raise UsageError(f"shard_size must be positive, got {shard_size}")
    folder = Path(folder)
    it = iter(src)
    shards = []
    for number in itertools.count():
        first = next(it, None)
        if first is None:
            break
        path = folder / f"{split}-{number:06d}.tar"
        with atomic_writer(path) as f:
            writer = TarWriter(f)
            count = 0
            for sample in itertools.chain([first], itertools.islice(it, shard_size - 1)):
                writer.add_sample(sample)
                count += 1
            writer.close()
        shards.append({"file": path.name, "count": count, "bytes": writer.bytes,
                       "sha256": writer.sha.hexdigest()})
    return shards


# -- reading ------------------------------------------------------------------------------


class ShardReadError(StoreError, OSError):
    """A shard's bytes are not a readable tar beyond some point (bad header, truncation).

    A ``StoreError`` (the CLI prints it and exits 2) and an ``OSError`` (an unreadable file),
    so callers that skip damaged shards and callers that stop on them both catch it.
    """


class ShardChecksumError(StoreError):
    """A shard that reads as a whole tar but whose size or sha256 differs from the manifest.

    Not an ``OSError``: the loader skips damaged tars, but a shard changed after ingest holds
    samples that look valid and may be wrong, so training stops on it as build-features does.
    """


class ShardInfo(NamedTuple):
    """A shard as the manifest lists it: path, sample count and, when recorded, its size in
    bytes and sha256 (hex); ``None`` skips that check."""

    path: Path
    count: int
    bytes: int | None = None
    sha256: str | None = None


def shard_infos(layout: StoreLayout, manifest: dict[str, Any], split: str) -> list[ShardInfo]:
    """``storage.split_shards`` plus each shard's recorded size and checksum, in shard order."""
    entries = manifest["splits"][split]["shards"] if manifest["splits"].get(split) else []
    paths = split_shards(layout, manifest, split)  # raises on a split without shards
    return [ShardInfo(path, count, _int_or_none(e.get("bytes")), e.get("sha256") or None)
            for (path, count), e in zip(paths, entries)]


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


class ShardSample(NamedTuple):
    key: str
    image: bytes
    ext: str
    meta: dict[str, Any]  # KEY.json; true_label/noisy in it are for diagnostics only


def read_tar(path: str | Path, *, sha256: str | None = None, size: int | None = None,
             count: int | None = None, defer: bool = False) -> Iterator[dict[str, Any]]:
    """Stage source: regular members of one ustar tar as ``{"fname", "data", "__url__"}``,
    then ``{}`` at the end of the shard (what ``webdataset.tariterators.group_by_keys`` expects).

    Members are parsed straight from their 512-byte headers: ``tarfile`` costs ~100 us per
    member in Python, about 10x this, which made reading shards slower than decoding them.
    Names from GNU long-name members, pax ``path`` records and the ustar prefix field are
    honoured; other member kinds (directories, links, global pax headers) are skipped.

    Args:
        path: the tar file.
        sha256, size: what the manifest records for this shard (hex digest, bytes), compared
            with the whole file as read. ``None``: not checked.
        count: how many samples the manifest lists for this shard, compared (both ways)
            with the samples of a whole tar before its first member. ``None``: not checked.
        defer: report a mismatch after the final ``{}`` instead of before the first member,
            so that damage the caller finds in the members (an image that does not decode)
            is reported first, naming the sample.

    Raises:
        ShardReadError: on a bad header checksum, a member cut short, or a file that ends
            without the end-of-archive marker, after yielding the members before the damage
            (whatever the checksum says: the damage is what to report).
        ShardChecksumError: the file is a readable tar but its size or sha256 differs from
            ``size``/``sha256``.
        StoreError: the file is a readable tar of another number of samples than ``count``.
    """
    name = Path(path).name
    with open(path, "rb") as f:
        buf = f.read()
    problem = None
    if size is not None and len(buf) != size:
        problem = f"size {len(buf)} bytes, manifest says {size}"
    elif sha256 is not None and (digest := hashlib.sha256(buf).hexdigest()) != sha256.lower():
        problem = f"sha256 {digest[:12]}..., manifest says {sha256[:12]}..."
    mismatch = None if problem is None else ShardChecksumError(
        f"{name}: {problem}; the shard changed after ingest, so its samples cannot be trusted: "
        "re-run ingest")
    if mismatch is not None and not defer:
        try:
            for _ in _members(buf, str(path), name):
                pass
        except ShardReadError:
            pass  # damage the tar itself shows: reported below, after the members before it
        else:
            raise mismatch
    if count is not None:
        _check_count(buf, name, count)
    yield from _members(buf, str(path), name)
    if mismatch is not None:
        raise mismatch


def _check_count(buf: bytes, name: str, count: int) -> None:
    """Refuse a whole tar whose samples the manifest miscounts: a count too low would shorten
    every epoch (the loader's quota comes from it) without any sample looking wrong."""
    # The unchecked walk is a few us per sample; headers are checked only on a disagreement,
    # to tell a miscount from damage (reported by the reading pass, where it happens).
    if _count_samples(buf, name, checked=False) == count:
        return
    found = _count_samples(buf, name, checked=True)
    if found is not None and found != count:
        raise StoreError(f"shard {name} holds {found} samples but the manifest lists {count}; "
                         "the manifest does not describe this shard: re-run ingest")


def _members(buf: bytes, url: str, name: str) -> Iterator[dict[str, Any]]:
    """``read_tar`` over bytes in memory (``name``: the shard's file name, for messages)."""
    for fname, start, size in _entries(buf, name):
        yield {"fname": fname, "data": buf[start : start + size], "__url__": url}
    yield {}


def _entries(buf: bytes, name: str, *, checked: bool = True) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular member of a tar in memory; ``checked``:
    verify each header's checksum."""
    pos, end = 0, len(buf)
    long_name = None
    while True:
        if pos + BLOCK > end:
            raise ShardReadError(f"{name}: truncated at byte {pos} (no end-of-archive marker); "
                                 "the shard is damaged, re-run ingest")
        h = buf[pos : pos + BLOCK]
        if not any(h):  # end-of-archive marker
            break
        size = _size(h, checked=checked)
        if size is None:
            raise ShardReadError(f"{name}: bad tar header at byte {pos}; the shard is damaged, "
                                 "re-run ingest")
        start, pos = pos + BLOCK, pos + BLOCK + -(-size // BLOCK) * BLOCK
        if start + size > end:
            raise ShardReadError(f"{name}: member truncated at byte {start}; the shard is damaged, "
                                 "re-run ingest")
        kind = h[156:157]
        if kind == b"L":  # GNU long name: the next member's name is this member's data
            long_name = _text(buf[start : start + size].split(b"\0", 1)[0], name, start)
            continue
        if kind == b"x":  # pax extended header (tarfile's default format): maybe a long path
            long_name = _pax_path(buf[start : start + size], name, start) or long_name
            continue
        if kind in (b"0", b"\0", b"7"):  # regular files, as tarfile's isfile()
            yield long_name or _member_name(h, name, start - BLOCK), start, size
        long_name = None


def _count_samples(buf: bytes, name: str, *, checked: bool) -> int | None:
    """Samples ``group_members`` makes of a tar in memory (headers only, no data copied);
    None when the tar is damaged, which the reading pass then reports where it happens."""
    count, last = 0, None
    try:
        for fname, _, _ in _entries(buf, name, checked=checked):
            parts = _split_name(fname)
            if parts is not None and parts[0] != last:
                count, last = count + 1, parts[0]
    except ShardReadError:
        return None
    return count


def _size(h: bytes, *, checked: bool = True) -> int | None:
    """Member size from a header, or None when its size field or (``checked``) its checksum
    is wrong."""
    try:
        size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if not checked:
            return size
        stored = int(h[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return None
    return size if stored == sum(h) - sum(h[148:156]) + 8 * 32 else None


def _text(raw: bytes, name: str, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ShardReadError(f"{name}: member name at byte {at} is not UTF-8; the shard is "
                             "damaged, re-run ingest") from None


def _member_name(h: bytes, name: str, at: int) -> str:
    member = _text(h[0:100].split(b"\0", 1)[0], name, at)
    prefix = _text(h[345:500].split(b"\0", 1)[0], name, at) if h[257:262] == b"ustar" else ""
    return f"{prefix}/{member}" if prefix else member


def _pax_path(data: bytes, name: str, at: int) -> str | None:
    """The ``path`` record of a pax header (records are ``"%d %s=%s\\n"``, length first)."""
    i = 0
    while i < len(data) and data[i] != 0:
        space = data.find(b" ", i)
        length = int(data[i:space]) if data[i:space].isdigit() else 0
        if space < 0 or length <= space - i:
            raise ShardReadError(f"{name}: malformed pax header at byte {at}; the shard is "
                                 "damaged, re-run ingest")
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        if key == b"path":
            return _text(value, name, at)
        i += length
    return None


def group_members(members: Iterable[dict[str, Any]], *, keep: Collection[str] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """Stage: members -> WebDataset samples ``{"__key__", "__url__", ext: bytes}``.

    The same grouping as ``webdataset.tariterators.group_by_keys`` (consecutive members sharing
    the part of the name before the first dot of its base name; ``{}`` ends a shard), without
    its per-member regular expression, which cost as much as reading the tar. ``keep``: only
    these (lower-case) extensions enter a sample, so e.g. ``KEY.json`` (ground truth) is never
    handed on; a key whose members are all dropped still yields ``{"__key__", "__url__"}``.
    """
    current: dict[str, Any] | None = None
    for m in members:
        if not m:
            if current is not None:
                yield current
            current = None
            continue
        parts = _split_name(m["fname"])
        if parts is None:
            continue
        key, ext = parts
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": m["__url__"]}
        if keep is None or ext in keep:
            current[ext] = m["data"]
    if current is not None:
        yield current


def _split_name(fname: str) -> tuple[str, str] | None:
    """``(key, lower-case extension)`` of a member name: the split is at the first dot of the
    base name (webdataset's rule); None for a name without one."""
    dot = fname.find(".", fname.rfind("/") + 1)
    if dot < 0:
        return None
    return fname[:dot], fname[dot + 1 :].lower()


def iter_tar(path: str | Path, *, sha256: str | None = None, size: int | None = None
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of one tar, members grouped by key.

    The key is the base name before its first dot. Raises ``ShardReadError`` on damage,
    ``ShardChecksumError`` when ``sha256``/``size`` (as in ``read_tar``) do not match.
    """
    for sample in group_members(read_tar(path, sha256=sha256, size=size)):
        key = sample.pop("__key__")
        del sample["__url__"]
        yield key.rpartition("/")[2], sample


def iter_split(store: str | Path, split: str, *, manifest: dict[str, Any] | None = None
               ) -> Iterator[ShardSample]:
    """Every sample of ``split`` in index order, read from the shards the manifest lists.

    Raises ``StoreError`` when a shard holds a different number of samples than the
    manifest says (a truncated or replaced shard), ``ShardReadError`` when it is not a
    readable tar, ``ShardChecksumError`` when its bytes differ from the manifest's checksum.
    """
    layout = StoreLayout(store)
    manifest = manifest or read_manifest(layout)
    for path, count, size, sha256 in shard_infos(layout, manifest, split):
        seen = 0
        for key, parts in iter_tar(path, sha256=sha256, size=size):
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if ext is None or "json" not in parts:
                raise StoreError(f"{path.name}: sample {key} lacks an image or KEY.json")
            seen += 1
            yield ShardSample(key, parts[ext], ext, json.loads(parts["json"]))
        if seen != count:
            raise StoreError(f"{path.name}: holds {seen} samples, manifest says {count}; "
                             "the store is damaged, ingest again")
