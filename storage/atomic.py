"""Atomic writes and advisory locks.

Every file a stage leaves in a store goes through this module: content is written to a
temporary file in the destination folder, flushed to disk, then renamed over the target.
A reader therefore sees either the old file or the whole new one, never a half-written one,
and a process killed mid-write leaves at most a ``.tmp-*`` file that nothing reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import SwiftSamplerError

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it into place.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_write_parquet(path: str | os.PathLike, table: Any, **kwargs: Any) -> None:
    """Write a ``pyarrow.Table`` as Parquet, atomically (zstd unless told otherwise)."""
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    with atomic_writer(path, "wb") as f:
        pq.write_table(table, f, **kwargs)


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = True) -> int:
    """Delete ``.tmp-*`` leftovers of a killed writer (files, and staging folders with their
    content); returns how many top-level leftovers were removed.

    Call it only while holding the lock of the stage that writes ``folder``: a live writer's
    temporary file looks the same as a dead one's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = TMP_PREFIX + "*"
    found = sorted(folder.rglob(pattern) if recursive else folder.glob(pattern))
    removed = 0
    for p in found:
        if any(parent.name.startswith(TMP_PREFIX) for parent in p.relative_to(folder).parents
               if parent.name):
            continue  # inside a staging folder removed with it
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LockedError(SwiftSamplerError, RuntimeError):
    """Another process holds the lock."""


# Descriptors of the locks this process holds. A forked child (a DataLoader worker) closes its
# copies at once: a flock belongs to the open file, so a worker that outlives a killed owner by
# a few seconds would otherwise keep the lock held, and an immediate rerun would be refused.
_HELD: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` or fail at once with a message naming ``what``.

    The kernel drops the lock when the process dies, so a crash never leaves a stale lock; forked
    children do not keep it (``_drop_inherited_locks``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _HELD.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{what} is in use by another process (lock {path}); wait for it to finish "
                "or stop it, then run the command again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)
