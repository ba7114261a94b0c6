"""Where everything lives inside a store directory (the store layout of the project's design)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SwiftSamplerError

SPLITS = ("train", "val", "test")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(SwiftSamplerError, ValueError):
    """A store is missing, incomplete or inconsistent; the message says what to do."""


def check_name(name: str, what: str = "name") -> str:
    """Run and search names become folder names: refuse anything that could leave the store."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise StoreError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (no '/', at most 128)"
        )
    return name


@dataclass(frozen=True)
class StoreLayout:
    """Paths of one store. Creating a layout touches nothing on disk."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples.parquet"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard(self, split: str, number: int) -> Path:
        return self.shards_dir / f"{split}-{number:06d}.tar"

    def shards(self, split: str) -> list[Path]:
        return sorted(self.shards_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def features_meta(self) -> Path:
        """``STORE/features.json``, beside the parts, so that ``features/`` holds Parquet only
        and opens as a dataset in pandas, Polars, Spark or DuckDB. Stores written before read
        (and keep) ``features/features.json``."""
        legacy = self.features_dir / "features.json"
        new = self.root / "features.json"
        return legacy if legacy.is_file() and not new.is_file() else new

    @property
    def dynamics(self) -> Path:
        """``STORE/dynamics.parquet``: per-image training dynamics of the features' checkpoint."""
        return self.root / "dynamics.parquet"

    def feature_parts(self) -> list[Path]:
        return sorted(self.features_dir.glob("part-*.parquet"))

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def cdf_table(self) -> Path:
        return self.tables_dir / "cdf.parquet"

    @property
    def cgf_table(self) -> Path:
        return self.tables_dir / "cgf.parquet"

    @property
    def points_table(self) -> Path:
        return self.tables_dir / "points.parquet"

    @property
    def tables_meta(self) -> Path:
        return self.tables_dir / "tables.json"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run(self, name: str) -> Path:
        return self.runs_dir / check_name(name, "run name")

    @property
    def searches_dir(self) -> Path:
        return self.root / "searches"

    def search(self, name: str) -> Path:
        return self.searches_dir / check_name(name, "search name")

    def lock(self, what: str) -> Path:
        return self.root / f".lock-{check_name(what)}"

    def inside(self, path: str | os.PathLike) -> Path:
        """Resolve ``path`` and refuse it unless it lies inside the store."""
        p = Path(path).resolve()
        if p != self.root and self.root not in p.parents:
            raise StoreError(f"path {path} lies outside the store {self.root}; refusing to write it")
        return p

    def require(self) -> StoreLayout:
        """Fail with a clear message unless an ingested store is here."""
        if not self.manifest.is_file():
            raise StoreError(
                f"no store at {self.root} (manifest.json missing): create one with "
                "`swift-sampler pipeline ingest --store ...`"
            )
        return self
