"""Scale by simulation: an ImageNet-sized feature store (1,281,167 images x 8 crops) on one machine.

Writes a synthetic store (manifest.json, samples.parquet, ``features/part-*.parquet`` with the
``storage.schemas.FEATURES`` schema, ``features.json``) into a temporary folder, then runs each
step in a fresh Python process and reports its wall time and peak resident memory (the child's
own ``ru_maxrss``, which includes the interpreter and imports: see the ``baseline`` step;
``seconds`` excludes interpreter start and imports, ``process_s`` includes them):

- ``read``: every feature part, all columns, as one Arrow table (``pyarrow.dataset``);
- ``read_columns``: the three columns the tables need (``swift_sampler.pipeline.sampler.table_store.read_feature_columns``,
  one query over the DuckDB catalog's ``feature_parts`` view);
- ``read_columns_pyarrow``: the same three columns read with ``pyarrow.dataset`` directly (how
  the stages read them before they went through the catalog), for the cost of the catalog;
- ``tables``: ``swift_sampler.pipeline.sampler.table_store.build_store_tables`` (1024 quantiles, 720 angles, written);
- ``tau``: ``load_tables`` + the loss/E^r columns + ``Sampler.tau`` for every row (also timed alone);
- ``sql_mean``: ``swift_sampler.storage.query`` mean loss by label over the ``features`` view;
- ``sql_cdf``: a query that needs the view's ``cdf_loss``/``cdf_entropy_r`` (window) columns.

At 10%, 50% and 100% of the size by default; the store is deleted afterwards. Prints one JSON
object: per fraction and step ``seconds`` and ``peak_rss_mb``, plus growth ratios 100%/10%.

    .venv/bin/python bench/bench_scale.py [--fractions 0.1,0.5,1] [--dir /tmp] [--steps ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from swift_sampler.storage.schemas import FEATURES, SAMPLES

REPO = Path(__file__).resolve().parents[1]

IMAGENET = 1_281_167
CLASSES = 1000

# Each step: code run in a fresh interpreter with ``store`` bound; it may set ``extra`` (dict).
STEPS = {
    "baseline": """
pass
""",
    "read": """
import pyarrow.dataset as ds
from swift_sampler.storage import StoreLayout
parts = [str(p) for p in StoreLayout(store).feature_parts()]
t = ds.dataset(parts, format="parquet").to_table()
extra = {"rows": t.num_rows, "arrow_mb": round(t.nbytes / 2**20, 1)}
""",
    "read_columns": """
from swift_sampler.pipeline.sampler.table_store import read_feature_columns
cols = read_feature_columns(store)
extra = {"rows": int(cols["loss"].size)}
""",
    "read_columns_pyarrow": """
import pyarrow.dataset as ds
from swift_sampler.storage import StoreLayout
parts = [str(p) for p in StoreLayout(store).feature_parts()]
t = ds.dataset(parts, format="parquet").to_table(columns=["loss", "entropy_r", "grad_norm"])
cols = {c: t[c].to_numpy() for c in ("loss", "entropy_r", "grad_norm")}
extra = {"rows": int(cols["loss"].size)}
""",
    "tables": """
from swift_sampler.pipeline.sampler.table_store import build_store_tables
meta = build_store_tables(store)
extra = {"rows": meta["rows"], "quantiles": meta["quantiles"], "angles": meta["angles"]}
""",
    "tau": """
import time
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables, read_feature_columns
tables = load_tables(store)
cols = read_feature_columns(store, ("loss", "entropy_r"))
s = Sampler((0.0, 0.2, 0.5, 0.8, 1.0), (0.1, 1.0, 0.6, 0.2, 0.0), 0.6, -0.8, "cgf",
            tables.subset(0.6, -0.8))
t_tau = time.perf_counter()
tau = s.tau(cols["loss"], cols["entropy_r"])
extra = {"rows": int(tau.size), "tau_only_s": round(time.perf_counter() - t_tau, 3),
         "mean_tau": float(tau.mean())}
""",
    "sql_mean": """
from swift_sampler.storage import query
t = query(store, "SELECT label, avg(loss) AS mean_loss, count(*) AS n FROM features GROUP BY label")
extra = {"groups": t.num_rows, "rows": int(sum(t["n"].to_pylist()))}
""",
    "sql_cdf": """
from swift_sampler.storage import query
t = query(store, "SELECT floor(cdf_loss * 10) AS decile, avg(cdf_entropy_r) AS mean_cdf_er, "
                 "avg(CAST(noisy AS DOUBLE)) AS flipped, count(*) AS n FROM features GROUP BY 1 ORDER BY 1")
extra = {"groups": t.num_rows, "rows": int(sum(t["n"].to_pylist()))}
""",
}

# Imports happen before the clock starts, so ``seconds`` is the step's own work.
CHILD = """
import json, resource, sys, time
import pyarrow.dataset, swift_sampler.pipeline.sampler.table_store, swift_sampler.pipeline.sampler.function, swift_sampler.storage
store = sys.argv[1]
extra = {}
_start = time.perf_counter()
exec(compile(sys.argv[2], "<step>", "exec"))
_seconds = time.perf_counter() - _start
print(json.dumps({"seconds": round(_seconds, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  **extra}))
"""


def write_store(root: Path, images: int, *, crops: int, parts: int, seed: int = 0) -> dict:
    """A synthetic store with ``images`` train samples and ``images * crops`` feature rows."""
    t0 = time.perf_counter()
    (root / "features").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    store_id = str(uuid.uuid4())
    labels = rng.integers(CLASSES, size=images).astype(np.int32)
    noisy = rng.random(images) < 0.4
    true = np.where(noisy, (labels + rng.integers(1, CLASSES, size=images)) % CLASSES, labels)
    index = np.arange(images, dtype=np.int64)
    samples = pa.table({
        "split": pa.array(np.full(images, "train", dtype=object)), "index": index,
        "key": pa.array([f"train-{i:08d}" for i in range(images)]),
        "shard": (index // 5000).astype(np.int32),
        "source": pa.array([f"synthetic/{i}" for i in range(images)]),
        "label": labels, "true_label": true.astype(np.int32), "noisy": noisy,
    }, schema=SAMPLES)
    pq.write_table(samples, root / "samples.parquet", compression="zstd")
    del samples
    bounds = np.linspace(0, images, parts + 1).astype(np.int64)
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        n = int(hi - lo) * crops
        idx = np.repeat(np.arange(lo, hi, dtype=np.int64), crops)
        loss = rng.gamma(0.7, 1.0, n).astype(np.float32)
        cols = {
            "index": idx, "crop": np.tile(np.arange(crops, dtype=np.int16), int(hi - lo)),
            "top": rng.integers(0, 32, n).astype(np.int16),
            "left": rng.integers(0, 32, n).astype(np.int16),
            "height": rng.integers(100, 224, n).astype(np.int16),
            "width": rng.integers(100, 224, n).astype(np.int16),
            "flip": rng.random(n) < 0.5, "label": np.repeat(labels[lo:hi], crops),
            "loss": loss, "entropy_r": (rng.beta(5, 2, n) * np.log(CLASSES - 1)).astype(np.float32),
            "grad_norm": (np.sqrt(1 - np.exp(-loss)) * rng.lognormal(2.5, 0.3, n)).astype(np.float32),
        }
        table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in FEATURES], schema=FEATURES)
        pq.write_table(table, root / "features" / f"part-{p:06d}.parquet", compression="zstd")
    prov = {"store_id": store_id, "checkpoint_sha256": "synthetic", "crops_per_image": crops,
            "grad_norm": "last-layer", "seed": 0}
    (root / "features.json").write_text(json.dumps(
        {**prov, "images": images, "rows": images * crops, "parts": parts, "done": True}))
    manifest = {
        "format": "swift-sampler-store", "version": 1, "store_id": store_id, "created": "synthetic",
        "source": "synthetic", "classes": [f"c{i}" for i in range(CLASSES)],
        "image": {"ext": "jpg", "channels": 3, "height": None, "width": None},
        "splits": {"train": {"count": images, "shards": []}},
        "noise": {"spec": "symmetric:0.4", "kind": "symmetric", "rate": 0.4, "realised": {}},
        "seed": seed, "skipped": [], "versions": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"images": images, "rows": images * crops, "parts": parts,
            "disk_mb": round(size / 2**20, 1), "write_s": round(time.perf_counter() - t0, 1)}


def run_step(store: Path, name: str, timeout: float) -> dict:
    env = dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store), STEPS[name]], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 3)  # with interpreter start and imports
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=IMAGENET)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--parts", type=int, default=128)
    ap.add_argument("--fractions", default="0.1,0.5,1")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic store goes")
    ap.add_argument("--repeats", type=int, default=1, help="runs per step (the median is kept)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    report = {"images_full": args.images, "crops": args.crops, "parts": args.parts,
              "cpus": os.cpu_count(), "results": {}}
    for frac in (float(f) for f in args.fractions.split(",")):
        images = max(1, round(args.images * frac))
        root = Path(tempfile.mkdtemp(prefix="swift-scale-", dir=args.dir))
        try:
            store = root / "store"
            # In a child process: a forked child starts with its parent's peak RSS, so the parent
            # must stay small for the steps' ru_maxrss to mean anything.
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(1) as pool:
                info = pool.apply(write_store, (store, images), {"crops": args.crops, "parts": args.parts})
            entry = {"store": info}
            print(json.dumps({"fraction": frac, **entry}), file=sys.stderr, flush=True)
            for name in steps:
                runs = [run_step(store, name, args.timeout) for _ in range(args.repeats)]
                ok = [r for r in runs if "error" not in r]
                if ok:
                    ok.sort(key=lambda r: r["seconds"])
                    entry[name] = {**ok[len(ok) // 2], "runs": len(ok)}
                else:
                    entry[name] = runs[0]
                print(json.dumps({"fraction": frac, "step": name, **entry[name]}), file=sys.stderr,
                      flush=True)
            report["results"][str(frac)] = entry
        finally:
            shutil.rmtree(root, ignore_errors=True)
    fr = sorted(report["results"], key=float)
    if len(fr) > 1:
        lo, hi = report["results"][fr[0]], report["results"][fr[-1]]
        report["growth"] = {
            name: {"rows_ratio": round(hi["store"]["rows"] / lo["store"]["rows"], 2),
                   "seconds_ratio": round(hi[name]["seconds"] / max(lo[name]["seconds"], 1e-9), 2),
                   "peak_rss_ratio": round(hi[name]["peak_rss_mb"] / lo[name]["peak_rss_mb"], 2)}
            for name in steps if "seconds" in lo.get(name, {}) and "seconds" in hi.get(name, {})}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
