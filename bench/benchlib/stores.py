"""The benchmark's data: a noisy store and its clean-label twin, carved from one image folder.

Both stores are ingested from the same source with the same seed, limit and fractions; the
twin gets ``noise="none"``. Ingest draws the subset, the splits and their order before the
noise, so the twins hold the same images under the same keys, and the twin's labels are the
noisy store's ground truth. ``check_twins`` proves it on ``samples.parquet`` before any
training. The test split is never noisy, so every model is scored on the noisy store's test.

Ground truth (``true_label``, ``noisy``) is read here only for the oracle and diagnostics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from swift_sampler.pipeline.ingest.build import ingest
from swift_sampler.storage import StoreError, StoreLayout, read_manifest, sha256_file

from .config import BenchConfig


def source_spec(data: str) -> str:
    """``DIR`` -> ``imagefolder:DIR``; a spec with a scheme (``digits``, ``imagefolder:...``) as is."""
    if ":" in data or data == "digits":
        return data
    if not Path(data).is_dir():
        raise StoreError(f"--data {data} is not a folder of class sub-folders (e.g. "
                         "../shared/datasets/cifar10/train)")
    return f"imagefolder:{Path(data).resolve()}"


def prepare_stores(config: BenchConfig, folder: Path, seed: int) -> dict[str, Any]:
    """Ingest (or reuse) ``folder/noisy`` and ``folder/clean`` for ``seed``; check they are twins.

    Returns ``{"noisy", "clean"}`` (paths) plus ``counts`` and realised ``noise``.
    """
    source = source_spec(config.data)
    stores = {}
    for kind, noise in (("noisy", config.noise), ("clean", "none")):
        store = folder / kind
        labels = config.labels if kind == "noisy" else None
        want = {"source": source, "seed": seed, "limit": config.limit,
                "val_frac": config.val_frac, "test_frac": config.test_frac}
        spec = f"labels:{Path(labels).name}" if labels else str(_spec(noise))
        if StoreLayout(store).manifest.is_file():
            manifest = read_manifest(StoreLayout(store))
            have = {k: manifest.get(k) for k in want}
            if have != want or manifest["noise"]["spec"] != spec or (
                    labels and manifest["noise"].get("labels_sha256") != sha256_file(labels)):
                raise StoreError(f"{store} holds another data set ({have}, noise "
                                 f"{manifest['noise']['spec']}); use a new --out folder")
        else:
            ingest(source, store, val_frac=config.val_frac, test_frac=config.test_frac,
                   noise=noise, seed=seed, limit=config.limit, shard_size=config.shard_size,
                   labels=labels, progress=config.progress)
        stores[kind] = store
    check_twins(stores["noisy"], stores["clean"])
    manifest = read_manifest(StoreLayout(stores["noisy"]))
    return {**stores, "counts": {k: v["count"] for k, v in manifest["splits"].items()},
            "noise": manifest["noise"]}


def _spec(noise: str):
    from swift_sampler.pipeline.ingest.noise import parse_noise

    return parse_noise(noise)


def check_twins(noisy: Path, clean: Path) -> None:
    """Refuse unless ``clean`` holds ``noisy``'s images, keys and splits with the true labels."""
    cols = ["split", "index", "key", "source", "label", "true_label"]
    a = pq.read_table(StoreLayout(noisy).samples, columns=cols).sort_by([("key", "ascending")])
    b = pq.read_table(StoreLayout(clean).samples, columns=cols).sort_by([("key", "ascending")])
    for col in ("split", "index", "key", "source", "true_label"):
        if not a.column(col).equals(b.column(col)):
            raise StoreError(f"{clean} is not the clean twin of {noisy}: column {col!r} differs; "
                             "ingest both with the same source, seed, limit and fractions")
    if not b.column("label").equals(b.column("true_label")):
        raise StoreError(f"{clean} has noisy labels; the clean twin must be ingested with noise none")


def ground_truth(store: Path, split: str = "train") -> dict[str, np.ndarray]:
    """Oracle/diagnostics only: ``label``, ``true_label`` and ``noisy`` by dense index, ``(N,)``."""
    table = pq.read_table(StoreLayout(store).samples, columns=["split", "index", "label", "true_label", "noisy"],
                          filters=[("split", "=", split)]).sort_by("index")
    index = table.column("index").to_numpy()
    if not np.array_equal(index, np.arange(len(index))):
        raise StoreError(f"{store}: split {split!r} indices are not dense 0..N-1")
    return {"label": table.column("label").to_numpy(),
            "true_label": table.column("true_label").to_numpy(),
            "noisy": table.column("noisy").to_numpy(zero_copy_only=False).astype(bool)}


def known_noise_rate(store: Path) -> float:
    """The expected share of flipped train labels implied by the noise spec (not the draw)."""
    noise = read_manifest(StoreLayout(store))["noise"]
    expected = (noise.get("expected") or {}).get("train")
    return float(expected if expected is not None else noise.get("rate") or 0.0)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    from swift_sampler.storage import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, _finite(json.loads(json.dumps(doc, default=_plain))))


def _finite(x):
    # NaN (a diagnostic without ground truth, a std of one value) is written as null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _plain(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "__fspath__"):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
