"""Benchmark: ingest of the shared CIFAR-10 JPEGs (50,000 images) into a temporary store.

Prints one JSON object: images/s of ``pipeline.ingest.build.ingest`` (median of ``--runs``), of a
plain ``webdataset.ShardWriter`` loop over the same files in the same process (the floor any
tar writer pays), their ratio, and the bytes of the shards against the source JPEG bytes.

    .venv/bin/python bench/bench_ingest.py [--source DIR] [--runs 3] [--limit N]

Absolute figures depend on what else runs on the machine; the ratio measured in the same run
is the stable number. Everything is written under a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "train"


def plain_shardwriter(files: list[tuple[str, int]], out: Path) -> float:
    """Seconds for the simplest WebDataset writer loop: read bytes, write jpg+cls."""
    import webdataset as wds

    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=5000, verbose=0) as sink:
        for i, (path, label) in enumerate(files):
            with open(path, "rb") as f:
                sink.write({"__key__": f"s-{i:08d}", "jpg": f.read(), "cls": label})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None,
                    help="quick check on N images (ingest takes a stratified subset, the plain "
                    "loop the first N files)")
    args = ap.parse_args()

    import torchvision.io  # noqa: F401  (import cost is not ingest cost)

    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.pipeline.ingest.sources import imagefolder

    src = imagefolder(args.source)
    files = [(it.path, it.label) for it in src.items][: args.limit]
    source_bytes = sum(os.path.getsize(p) for p, _ in files)
    ours, plain, summary = [], [], None
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        for run in range(args.runs):
            plain_dir = Path(tmp) / f"plain{run}"
            plain_dir.mkdir()
            plain.append(len(files) / plain_shardwriter(files, plain_dir))
            plain_bytes = sum(p.stat().st_size for p in plain_dir.iterdir())
            store = Path(tmp) / f"store{run}"
            t0 = time.perf_counter()
            summary = ingest(f"imagefolder:{args.source}", store, limit=args.limit,
                             val_frac=0.1, test_frac=0.1, seed=run, progress=False)
            ours.append(sum(summary["counts"].values()) / (time.perf_counter() - t0))
            for folder in (plain_dir, store):
                for p in sorted(folder.rglob("*"), reverse=True):
                    p.rmdir() if p.is_dir() else p.unlink()
    result = {
        "bench": "ingest",
        "source": args.source,
        "images": len(files),
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "ingest_images_per_s": round(statistics.median(ours), 1),
        "ingest_images_per_s_runs": [round(x, 1) for x in ours],
        "plain_shardwriter_images_per_s": round(statistics.median(plain), 1),
        "plain_shardwriter_images_per_s_runs": [round(x, 1) for x in plain],
        "ratio_ingest_vs_plain": round(statistics.median(o / p for o, p in zip(ours, plain)), 3),
        "source_jpeg_bytes": source_bytes,
        "shard_bytes": summary["bytes"],
        "shard_bytes_per_source_byte": round(summary["bytes"] / source_bytes, 2),
        "plain_shard_bytes_per_source_byte": round(plain_bytes / source_bytes, 2),
        "skipped": summary["skipped"],
        "target_images_per_s": 5000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
