"""``best_sampler.json``: a self-contained, versioned sampler file .

Layout (JSON, parsed as data only)::

    {"format": "swift-sampler/sampler", "version": 2,
     "parameters": {"e1": .., "e2": .., "e3": .., "v0": .., ..., "v4": .., "c1": .., "c2": ..},
     "transform": "cgf" | "cdf", "features": [f1, f2], "cdf_by": "global" | "class",
     "tables": {"quantiles": Q, "angle_count": A, "rows": n,
                "cdf": {f1: [Q+1 floats], f2: [Q+1 floats]},  # by class: [[Q+1 floats] per label]
                "angles": [radians...], "knots": [[Q+1 floats] per angle]},
     "provenance": {"store_id": .., "features_checkpoint_sha256": .., "search": ..,
                    "trial": .., "score": ..,
                    "learned_with": {"features": "store" | "image" | "online",
                                     "selection": "systematic" | "es"}}}

``features`` is the feature pair (``pair.FeaturePair``; ``["loss", "entropy_r"]``, the paper's, by
default) and ``cdf_by`` whether each feature's cdf is over all crops or within each given label.
Version 1 (before pairs) always meant ``["loss", "entropy_r"]`` over all crops: ``migrate``
reads it as such. Using a sampler on a store that lacks one of its features is refused, naming
the feature (``pair.read_pair_columns``).

``learned_with`` is how the search's trials drew and kept crops; training with the sampler
uses the same unless told otherwise (``sampler_stage``). Files written before it was recorded
have none.

Floats are written by ``json`` (shortest repr), so a load returns bit-identical numbers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from swift_sampler.storage import (
    StoreLayout,
    UsageError,
    atomic_write_text,
    read_features_meta,
    read_manifest,
)

from .function import PARAMETERS, TRANSFORMS, Sampler, SamplerError
from .pair import DEFAULT_PAIR, FeaturePair, read_pair_columns
from .transform import FeatureTables, TablesError

log = logging.getLogger(__name__)

FORMAT = "swift-sampler/sampler"
VERSION = 2
PROVENANCE_FIELDS = ("store_id", "features_checkpoint_sha256", "search", "trial", "score")


class SamplerFileError(SamplerError):
    """A sampler file is unreadable, malformed, foreign or useless; the message names the field."""


def sampler_to_dict(sampler: Sampler, provenance: dict | None = None) -> dict[str, Any]:
    s = sampler.embedded()
    tab = s.tables
    tables = None
    if tab is not None:
        tables = {
            "quantiles": tab.quantiles, "angle_count": tab.angle_count, "rows": tab.rows,
            "cdf": {f: np.asarray(tab.cdf_knots[f]).tolist() for f in s.pair.features},
            "angles": tab.angles.tolist(),
            "knots": tab.knots[s.transform].tolist() if s.transform in tab.knots else [],
        }
    prov = {k: (provenance or {}).get(k) for k in PROVENANCE_FIELDS}
    prov.update({k: v for k, v in (provenance or {}).items() if k not in prov})
    return {
        "format": FORMAT, "version": VERSION,
        "parameters": s.parameters(), "transform": s.transform, **s.pair.record(),
        "tables": tables, "provenance": prov,
    }


def save_sampler(path: str | os.PathLike, sampler: Sampler, provenance: dict | None = None) -> Path:
    """Write ``sampler`` (with its tables subset) and ``provenance`` to ``path`` atomically."""
    text = json.dumps(sampler_to_dict(sampler, provenance), indent=1, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return Path(path)


def load_sampler(path: str | os.PathLike, *, check_zero: bool = True) -> tuple[Sampler, dict]:
    """Read and validate a sampler file.

    Returns:
        ``(sampler, provenance)``; the sampler holds the embedded tables subset.

    Raises:
        SamplerFileError: unreadable JSON, wrong format/version, or any bad field (named).
    """
    try:
        doc = json.loads(Path(path).read_text(), parse_constant=_no_constant)
    except OSError as e:
        raise SamplerFileError(f"cannot read sampler file {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SamplerFileError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:  # nesting deeper than the parser's stack: no sampler file is
        raise SamplerFileError(f"{path} is not a sampler file: its JSON nests too deeply") from None
    sampler, prov = sampler_from_dict(doc, where=str(path))
    if check_zero:
        check_not_all_zero(sampler)
    return sampler, prov


def migrate(doc: dict) -> dict:
    """A sampler document of any supported version as the current version."""
    if doc.get("version") == 1:
        # Version 1 could only hold the paper's pair, its cdf over all crops.
        doc = {**doc, "version": 2, "cdf_by": "global"}
    return doc


def sampler_from_dict(doc: Any, *, where: str = "sampler") -> tuple[Sampler, dict]:
    if not isinstance(doc, dict):
        raise SamplerFileError(f"{where}: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise SamplerFileError(f"{where}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    doc = migrate(doc)
    if doc.get("version") != VERSION:
        raise SamplerFileError(f"{where}: version {doc.get('version')!r} is not supported (expected 1 or {VERSION})")
    params = doc.get("parameters")
    if not isinstance(params, dict):
        raise SamplerFileError(f"{where}: parameters: expected an object with {', '.join(PARAMETERS)}")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise SamplerFileError(f"{where}: parameters: unknown {unknown} (expected {', '.join(PARAMETERS)})")
    transform = doc.get("transform")
    if transform not in TRANSFORMS:
        raise SamplerFileError(f"{where}: transform: unknown {transform!r} (expected one of {TRANSFORMS})")
    if "features" not in doc:
        raise SamplerFileError(f"{where}: features: missing (the sampler's two features, e.g. "
                               f"{list(DEFAULT_PAIR.features)})")
    try:
        pair = FeaturePair.from_record(doc)
    except UsageError as e:
        raise SamplerFileError(f"{where}: {e}") from None
    prov = doc.get("provenance")
    if not isinstance(prov, dict):
        raise SamplerFileError(f"{where}: provenance: expected an object")
    try:
        tables = _tables_from_dict(doc.get("tables"), transform, pair, where)
        endpoints = (0.0, params.get("e1"), params.get("e2"), params.get("e3"), 1.0)
        values = tuple(params.get(f"v{s}") for s in range(5))
        from .function import check_parameters

        check_parameters(params)
        sampler = Sampler(endpoints, values, params["c1"], params["c2"], transform, tables)
    except (SamplerError, TablesError, TypeError) as e:
        raise SamplerFileError(f"{where}: {e}") from None
    if tables is None and not (sampler.c1 == 0 and sampler.c2 == 0):
        raise SamplerFileError(f"{where}: tables: missing")
    return sampler, prov


def _tables_from_dict(t: Any, transform: str, pair: FeaturePair, where: str) -> FeatureTables | None:
    if t is None:
        return None
    if not isinstance(t, dict):
        raise SamplerFileError(f"{where}: tables: expected an object")
    for key in ("quantiles", "angle_count", "rows", "cdf", "angles", "knots"):
        if key not in t:
            raise SamplerFileError(f"{where}: tables.{key}: missing")
    for key in ("quantiles", "angle_count", "rows"):
        if not isinstance(t[key], int) or isinstance(t[key], bool):
            raise SamplerFileError(f"{where}: tables.{key}: expected an integer, got {t[key]!r}")
    cdf = t["cdf"]
    if not isinstance(cdf, dict) or set(cdf) != set(pair.features):
        raise SamplerFileError(f"{where}: tables.cdf: expected knots of {list(pair.features)}")
    q1 = t["quantiles"] + 1
    by_class = pair.cdf_by == "class"
    arrays = {f: _floats(cdf[f], f"tables.cdf.{f}", where, "rows" if by_class else (q1,)) for f in pair.features}
    angles = _floats(t["angles"], "tables.angles", where, None)
    knots = _floats(t["knots"], "tables.knots", where, (angles.size, q1)) if angles.size else np.empty((0, q1))
    try:
        return FeatureTables(t["quantiles"], t["angle_count"], arrays, angles, {transform: knots}, t["rows"],
                             pair=pair)
    except TablesError as e:
        raise SamplerFileError(f"{where}: {e}") from None


def _floats(x: Any, field: str, where: str, shape) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise SamplerFileError(f"{where}: {field}: expected numbers") from None
    if shape is None:
        if a.ndim != 1:
            raise SamplerFileError(f"{where}: {field}: expected a list of numbers")
    elif shape == "rows":  # one list of numbers per given label
        if a.ndim != 2 or not a.shape[0]:
            raise SamplerFileError(f"{where}: {field}: expected a list of lists of numbers, one per label")
    elif a.shape != shape:
        raise SamplerFileError(f"{where}: {field}: expected shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise SamplerFileError(f"{where}: {field}: non-finite value")
    return a


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def learned_with(provenance: dict | None) -> dict[str, str]:
    """How the sampler's search drew candidates (``features``) and kept half (``selection``).

    The sampler was chosen for what it does through that stage, so training with it should use
    the same. ``{}`` for a file that does not record it (written before it was recorded).
    """
    rec = (provenance or {}).get("learned_with")
    if not isinstance(rec, dict):
        return {}
    return {k: rec[k] for k in ("features", "selection") if isinstance(rec.get(k), str)}


def sampler_stage(provenance: dict | None, features: str | None = None,
                  selection: str | None = None) -> tuple[str, str]:
    """The sampler stage to train with: ``features`` and ``selection`` as given, else what the
    search used (``learned_with``), else ``store`` / ``systematic`` (files that record nothing).

    A sampler is chosen for what it does through one stage; through another it is a different
    sampler, so an explicit mismatch is honoured but logged.
    """
    learned = learned_with(provenance)
    chosen = {"features": features or learned.get("features", "store"),
              "selection": selection or learned.get("selection", "systematic")}
    for flag, value in chosen.items():
        if learned.get(flag, value) != value:
            log.warning("the sampler was searched with --%s %s; training with --%s %s as asked",
                        flag, learned[flag], flag, value)
    return chosen["features"], chosen["selection"]


_ALLOW = "pass --allow-foreign-tables (allow_foreign=True from Python)"


def check_provenance(provenance: dict, store, allow_foreign: bool = False, *,
                     recorded_only: bool = False) -> None:
    """Refuse a sampler whose tables came from another store or other features.

    Compares ``store_id`` with the store's manifest and ``features_checkpoint_sha256`` with
    ``features.json`` (when the store has features). ``allow_foreign`` skips both. The one rule
    for every way a sampler file is used (``train --sampler``, ``train_model``,
    ``sampler_weights``, ``keep_by_tau``, ``dropped``); a ``Sampler`` object has no provenance.
    ``recorded_only`` (the Python API) checks only the fields the file records, so a file saved
    from a ``Sampler`` without provenance is taken as the object would be.
    """
    if allow_foreign:
        return
    provenance = provenance or {}

    def differs(field: str, mine: Any) -> bool:
        # The Python API compares only what the file records (a file saved from a Sampler
        # without provenance is taken as the object is); the CLI compares every field.
        theirs = provenance.get(field)
        return theirs != mine and not (recorded_only and theirs is None)

    layout = StoreLayout(store).require()
    manifest = read_manifest(layout)
    mine = manifest.get("store_id")
    theirs = provenance.get("store_id")
    if differs("store_id", mine):
        raise SamplerFileError(
            f"provenance.store_id: the sampler was built on store {theirs!r}, this store is {mine!r}; "
            f"{_ALLOW} to use it anyway")
    if layout.features_meta.is_file():
        sha = read_features_meta(layout).get("checkpoint_sha256")
        if differs("features_checkpoint_sha256", sha):
            raise SamplerFileError(
                "provenance.features_checkpoint_sha256: the sampler was built from features of "
                f"checkpoint {provenance.get('features_checkpoint_sha256')!r}, the store's features come "
                f"from {sha!r}; {_ALLOW} to use it anyway")


def check_not_all_zero(sampler: Sampler, store=None, *, grid: int = 129) -> None:
    """Refuse a sampler whose tau is 0 on every feature row of ``store`` (or on a grid).

    Without a store the check runs on a ``grid x grid`` lattice of (cdf f1, cdf f2). With a
    store, one that lacks a feature of the sampler is refused, naming it.
    """
    if max(sampler.values) <= 0:
        raise SamplerFileError("values: all v0..v4 are 0, so tau is 0 for every crop; nothing would be trained")
    if store is not None:
        tau = sampler.tau_columns(read_pair_columns(store, sampler.pair))
        where = f"every feature row of {store}"
    else:
        u = np.linspace(0.0, 1.0, grid)
        f1, f2 = np.meshgrid(u, u)
        tau = sampler.tau_from_cdf(f1, f2)
        n1, n2 = sampler.pair.features
        where = f"a {grid}x{grid} grid of (cdf {n1}, cdf {n2})"
    if not np.any(tau > 0):
        raise SamplerFileError(f"tau is 0 on {where}: the sampler would keep no crop; choose another sampler")


__all__ = ["FORMAT", "PROVENANCE_FIELDS", "VERSION", "SamplerFileError", "check_not_all_zero",
           "check_provenance", "learned_with", "load_sampler", "migrate", "sampler_from_dict", "sampler_stage",
           "sampler_to_dict", "save_sampler"]
