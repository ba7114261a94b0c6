"""Benchmark: the sharded loader vs torchvision ``ImageFolder`` + ``DataLoader`` on CIFAR-10.

Both produce augmented training batches (pad-4 random crop + horizontal flip) with the same
number of workers and batch size: ours as uint8 crops from WebDataset shards, the usual choice
as float tensors from ``ToTensor``. Runs alternate (ours, peer, ours, peer, ...) so that both
see the same machine load; prints one JSON object with the median images/s of each and their
ratio.

    .venv/bin/python bench/bench_loader.py --store /tmp/cifar-store \
        [--imagefolder ../shared/datasets/cifar10/train] [--workers 2] [--batch-size 256] \
        [--batches 120] [--runs 3]

The store is one built from the same JPEGs, e.g.
``pipeline.ingest.build.ingest("imagefolder:DIR", "/tmp/cifar-store", val_frac=0, test_frac=0.1)``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "train"


def time_batches(loader, batches: int) -> float:
    """Images/s over ``batches`` batches, worker start-up included (as an epoch pays it)."""
    t0 = time.perf_counter()
    n = 0
    for batch in itertools.islice(loader, batches):
        n += len(batch["label"]) if isinstance(batch, dict) else len(batch[1])
    return n / (time.perf_counter() - t0)


def ours(store: str, workers: int, batch_size: int, epoch: int):
    from swift_sampler.train.loader import create_loader

    loader, ds = create_loader(store, "train", batch_size=batch_size, num_workers=workers,
                               seed=epoch)
    ds.set_epoch(epoch)
    return loader


def peer(folder: str, workers: int, batch_size: int):
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    return DataLoader(ImageFolder(folder, transform=tf), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--imagefolder", default=str(DEFAULT_FOLDER))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=120, help="batches timed per run")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    results: dict[str, list[float]] = {"ours": [], "imagefolder": []}
    for run in range(args.runs):
        results["ours"].append(time_batches(ours(args.store, args.workers, args.batch_size, run),
                                            args.batches))
        results["imagefolder"].append(time_batches(
            peer(args.imagefolder, args.workers, args.batch_size), args.batches))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({
        "bench": "loader", "workers": args.workers, "batch_size": args.batch_size,
        "batches": args.batches, "runs": args.runs,
        "ours_images_per_s": round(med["ours"], 1),
        "imagefolder_images_per_s": round(med["imagefolder"], 1),
        "ratio": round(med["ours"] / med["imagefolder"], 3),
        "ratios_per_run": [round(a / b, 3) for a, b in zip(results["ours"], results["imagefolder"])],
        "all": {k: [round(x, 1) for x in v] for k, v in results.items()},
    }))


if __name__ == "__main__":
    main()
