"""Labels from a file (``ingest --labels FILE``): the noisy labels a practitioner actually has.

``FILE`` is CSV or Parquet with the columns ``path`` (relative to the ``imagefolder:`` root,
``class/file.jpg``, or ``file.jpg`` in a flat folder) and ``label`` (a class name): what an
annotation tool exports, or CIFAR-10N's files. A flat folder (images, no class subfolders)
takes its classes and labels from the file alone. Every image of the source needs exactly one row: a missing image is refused
rather than silently dropped (its absence would change the data set without a trace; make the
file complete, or build the source folder from the images you have labels for). A header that
names ``path`` or ``label`` twice is refused too (which column is meant cannot be told). Each
error names the file, the row (1-based, header excluded) and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from swift_sampler.storage.errors import SwiftSamplerError

COLUMNS = ("path", "label")


class LabelFileError(SwiftSamplerError, ValueError):
    """A label file that cannot be used; the message names the file, the row and the fix."""


def read_label_file(path: str | os.PathLike, *, classes: Sequence[str],
                    names: Sequence[str]) -> tuple[dict[str, int], str]:
    """``({image name: class index}, sha256 of the file)`` for every image of the source.

    Args:
        path: the CSV or Parquet file.
        classes: the source's class names (index order).
        names: the source's image names (``Item.name``: the path relative to the root).

    Raises:
        LabelFileError: unreadable or empty file, a missing column, an unknown class, a path
            listed twice or not in the source, an image of the source with no row.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"--labels {path}: no such file")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    rows = _rows(path, data)
    if not rows:
        raise LabelFileError(f"--labels {path} has no rows; it needs a header `path,label` and "
                             "one row per image")
    index = {c: i for i, c in enumerate(classes)}
    known = set(names)
    out: dict[str, int] = {}
    for n, (p, label) in enumerate(rows, start=1):
        p = str(p).strip().replace("\\", "/")
        label = str(label).strip()
        if label not in index:
            raise LabelFileError(f"--labels {path}, row {n}: class {label!r} is not one of the "
                                 f"source's classes ({', '.join(classes)}); fix the row or the "
                                 "class folder names")
        if p in out:
            raise LabelFileError(f"--labels {path}, row {n}: path {p!r} is listed twice; keep one "
                                 "row per image")
        if p not in known:
            raise LabelFileError(f"--labels {path}, row {n}: path {p!r} is not an image of the "
                                 "source; paths are relative to the imagefolder root, like "
                                 f"{next(iter(names), 'class/file.jpg')!r}")
        out[p] = index[label]
    missing = [name for name in names if name not in out]
    if missing:
        raise LabelFileError(f"--labels {path} has no row for {len(missing)} image(s) of the "
                             f"source (e.g. {missing[0]!r}); every image needs a label: add the "
                             "rows, or leave the unlabelled images out of the source folder")
    return out, sha


def read_label_rows(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The ``(path, label)`` rows of a label file as written (paths with ``/``), unchecked
    against any source: what a flat image folder takes its classes from."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"--labels {path}: no such file")
    return [(str(p).strip().replace("\\", "/"), str(label).strip())
            for p, label in _rows(path, path.read_bytes())]


def _rows(path: Path, data: bytes) -> list[tuple[str, str]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Columns are checked on the schema first: Arrow's own error for a column named twice
        # does not say which one or what to do.
        _check_columns(path, _parquet(path, lambda: pq.read_schema(pa.BufferReader(data))).names)
        table = _parquet(path, lambda: pq.read_table(pa.BufferReader(data), columns=list(COLUMNS)))
        return list(zip(table.column("path").to_pylist(), table.column("label").to_pylist()))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelFileError(f"--labels {path} is not UTF-8 text; export it as CSV (UTF-8) or "
                             "Parquet") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise LabelFileError(f"--labels {path} is empty; it needs a header `path,label` and one "
                             "row per image")
    reader = csv.DictReader(lines)
    rows = []
    try:
        _check_columns(path, reader.fieldnames or [])
        for n, row in enumerate(reader, start=1):
            if row.get("path") is None or row.get("label") is None:
                raise LabelFileError(f"--labels {path}, row {n}: expected a path and a label")
            rows.append((row["path"], row["label"]))
    except csv.Error as e:  # a field over the csv module's limit, a stray quote ...
        raise LabelFileError(f"--labels {path}, line {reader.line_num + 1}: not readable as CSV "
                             f"({e}); each row is `path,label`") from None
    return rows


def _parquet(path: Path, read: Callable[[], Any]) -> Any:
    """``read()``, with any failure of Arrow's reported as an unreadable Parquet label file."""
    try:
        return read()
    except Exception as e:
        raise LabelFileError(f"--labels {path} is not a readable Parquet file: "
                             f"{str(e).splitlines()[0]}") from None


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    names = [str(x).strip() for x in columns]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise LabelFileError(f"--labels {path} has no column {', '.join(map(repr, missing))} "
                             f"(columns: {', '.join(map(str, columns)) or 'none'}); it needs "
                             "`path,label`")
    # A CSV reader keeps the last of two same-named columns: which one is meant cannot be told.
    twice = [f"{c!r} appears {names.count(c)} times" for c in COLUMNS if names.count(c) > 1]
    if twice:
        raise LabelFileError(f"--labels {path}: column {', column '.join(twice)} in the header; "
                             "keep one `path` and one `label` column")


__all__ = ["COLUMNS", "LabelFileError", "read_label_file", "read_label_rows"]
