"""The store: layout on disk, Arrow schemas, atomic writes, manifest and DuckDB catalog.

Invariants every writer keeps:
- a file appears whole or not at all (``atomic_writer``: temp file + rename);
- ``manifest.json`` is written last by ingest; shards never change after it exists;
- each later stage writes only its own folder (``features/``, ``tables/``, ``runs/NAME``,
  ``searches/NAME``) and never a path outside the store;
- ground-truth noise columns live in ``samples`` only, for diagnostics.
"""

from .atomic import (
    LockedError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    atomic_writer,
    exclusive_lock,
    remove_stale_temporaries,
)
from .catalog import QueryError, available_views, connect, literal, query, read_view
from .errors import SwiftSamplerError, UsageError
from .layout import SPLITS, StoreError, StoreLayout, check_name
from .manifest import (
    num_classes,
    package_versions,
    read_features_meta,
    read_json_object,
    read_manifest,
    sha256_file,
    split_shards,
    verify_shards,
    write_manifest,
)

__all__ = [
    "SPLITS",
    "LockedError",
    "QueryError",
    "StoreError",
    "StoreLayout",
    "SwiftSamplerError",
    "UsageError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "atomic_write_text",
    "atomic_writer",
    "available_views",
    "check_name",
    "connect",
    "exclusive_lock",
    "num_classes",
    "package_versions",
    "literal",
    "query",
    "read_view",
    "read_features_meta",
    "read_json_object",
    "read_manifest",
    "remove_stale_temporaries",
    "sha256_file",
    "split_shards",
    "verify_shards",
    "write_manifest",
]
