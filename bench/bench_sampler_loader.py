"""Benchmark: the training loader with the sampler stage vs uniform sampling vs the usual peer.

Three loaders deliver augmented training batches of ``--batch-size`` with ``--workers`` worker
processes; each measured pass times ``--images`` images reaching the training step (batches are
iterated and their tensors touched; no model runs), worker start-up included, as an epoch pays it:

- ``A`` uniform: ``train.loader.create_loader(store, "train", ...)`` exactly as
  ``train.trainer.fit`` builds it without a sampler (one random pad-and-flip crop per image);
- ``B`` filtered: the same call with the ``SamplerHook`` of
  ``train.sampling.create_sampler_hook(store, sampler, features="store")``: per image two of its
  K stored crops, replayed, and B of the 2B kept with probability ~ tau (arXiv 2410.05578, §4.2);
- ``C`` peer: torchvision ``ImageFolder`` on the source JPEGs + ``WeightedRandomSampler`` whose
  weight for an image is the mean tau of its stored crops (0 for images outside the store's
  train split) + ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor`` +
  ``DataLoader``.

Passes are interleaved (A, B, C, A, B, C, ...) so that all three see the same machine load;
one JSON object reports every pass, the medians and the ratios B/A (target >= 0.95) and B/C
(target >= 1.5), both per round and of the medians. Absolute images/s depend on what else runs.

    .venv/bin/python bench/bench_sampler_loader.py [--store /tmp/sl-store-25k] [--images 160000] \
        [--repeats 5] [--batch-size 256] [--workers 2] [--out result.json]

Without an existing ``--store`` the default one is built first: 25,000 of the shared CIFAR-10
JPEGs ingested (train 20,000), and features from a freshly initialised ``tiny-cnn`` (K = 4); the
throughput does not depend on how good the model is. A store without features gets them the same
way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "train"
DEFAULT_STORE = "/tmp/sl-store-25k"
# A sampler that drops high-loss crops: c = (1, 0) so t = cgf(cdf(loss)); tau = 1 on the lower
# half of t, 0.6 at t = 0.5 falling to 0 at t = 0.75, and 0 above it.
DEFAULT_POINT = (0.25, 0.5, 0.75, 1.0, 1.0, 0.6, 0.0, 0.0, 1.0, 0.5)
TARGET_B_OVER_A = 0.95
TARGET_B_OVER_C = 1.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the store


def prepare_store(store: str, folder: str, *, default: bool) -> dict[str, Any]:
    """Make sure ``store`` is ingested and has features (and tables); report what was built."""
    from swift_sampler.storage import StoreLayout

    layout = StoreLayout(store)
    built: dict[str, Any] = {}
    if not layout.manifest.is_file():
        if not default:
            raise SystemExit(f"error: {store} is not a store (no manifest.json); ingest it first "
                             "or leave out --store to build the default one")
        from swift_sampler.pipeline.ingest.build import ingest

        log(f"ingesting 25000 images of {folder} into {store} ...")
        t0 = time.perf_counter()
        ingest(f"imagefolder:{folder}", store, limit=25000, val_frac=0.1, test_frac=0.1, seed=0,
               progress=False)
        built["ingest_s"] = round(time.perf_counter() - t0, 1)
    if not layout.features_meta.is_file() or not layout.tables_meta.is_file():
        from swift_sampler.pipeline.features.build import build_features
        from swift_sampler.storage import read_manifest
        from swift_sampler.train.models import create_model

        manifest = read_manifest(layout)
        image = manifest["image"]
        torch.manual_seed(0)
        model = create_model("tiny-cnn", len(manifest["classes"]), in_chans=image["channels"],
                             image_size=image.get("height") or 32)
        log(f"building features of {store} with a fresh tiny-cnn (K=4) ...")
        t0 = time.perf_counter()
        build_features(store, model, crops_per_image=4, seed=0, device="cpu", workers=0,
                       progress=False)
        built["features_s"] = round(time.perf_counter() - t0, 1)
    return built


def image_weights(store: str, sampler) -> tuple[np.ndarray, np.ndarray, float]:
    """Per train image (dense index): mean tau of its stored crops, float64 ``(N,)``; the
    ``source`` path of each, ``(N,)`` str; and the fraction of stored crops with tau = 0."""
    from swift_sampler.storage import StoreLayout

    layout = StoreLayout(store)
    feats = pq.read_table(layout.feature_parts(), columns=["index", "loss", "entropy_r"])
    index = feats.column("index").to_numpy()
    tau = np.asarray(sampler.tau(feats.column("loss").to_numpy().astype(np.float32),
                                 feats.column("entropy_r").to_numpy().astype(np.float32)),
                     dtype=np.float64)
    n = int(index.max()) + 1
    weights = np.bincount(index, weights=tau, minlength=n) / np.bincount(index, minlength=n)
    samples = pq.read_table(layout.samples, columns=["split", "index", "source"]).to_pydict()
    sources = np.empty(n, dtype=object)
    for split, i, src in zip(samples["split"], samples["index"], samples["source"]):
        if split == "train" and i < n:
            sources[i] = src
    return weights, sources, float(np.mean(tau == 0))


# ----------------------------------------------------------------------------- the loaders


def create_ours(store: str, hook, *, batch_size: int, workers: int, pin_memory: bool, seed: int):
    """The loader ``train.trainer.fit`` builds for ``hook`` (None: uniform sampling)."""
    from swift_sampler.train.loader import create_loader
    from swift_sampler.train.trainer import SamplerHook

    hook = hook or SamplerHook(candidates_per_image=1)
    return create_loader(
        store, "train", batch_size=batch_size, train=True, seed=seed, num_workers=workers,
        candidates_per_image=hook.candidates_per_image if hook.batch_filter else 1,
        crop_stage=hook.crop_stage, batch_filter=hook.batch_filter, pin_memory=pin_memory)


def create_peer(folder: str, weights: np.ndarray, sources: np.ndarray, *, batch_size: int,
                workers: int, pin_memory: bool, images: int, seed: int):
    """ImageFolder + WeightedRandomSampler(weights of the store's train images) + DataLoader."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, WeightedRandomSampler
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    dataset = ImageFolder(folder, transform=tf)
    where = {os.path.relpath(path, folder): j for j, (path, _) in enumerate(dataset.samples)}
    w = torch.zeros(len(dataset), dtype=torch.float64)
    missing = [s for s in sources if s not in where]
    if missing:
        raise SystemExit(f"error: {len(missing)} train images of the store are not in {folder} "
                         f"(e.g. {missing[0]!r}); pass the folder the store was ingested from")
    w[[where[s] for s in sources]] = torch.from_numpy(weights)
    generator = torch.Generator().manual_seed(seed)
    sampler = WeightedRandomSampler(w, num_samples=math.ceil(images / batch_size) * batch_size,
                                    replacement=True, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True)


# ----------------------------------------------------------------------------- timing


def touch(x: torch.Tensor, y: torch.Tensor) -> None:
    # Read every byte of the batch, as the step's host-to-device copy would.
    x.sum()
    y.sum()


def time_ours(loader, ds, images: int, epoch: int) -> dict[str, Any]:
    """One pass of ``images`` images; epochs follow one another (new workers each) as needed."""
    n = candidates = batches = short = 0
    t0 = time.perf_counter()
    seconds = 0.0
    while n < images:
        ds.set_epoch(epoch)
        epoch += 1
        it = iter(loader)
        for batch in it:
            touch(batch["image"], batch["label"])
            got = len(batch["label"])
            n += got
            batches += 1
            short += got < ds.batch_size
            candidates += int(batch.get("candidates", got))
            seconds = time.perf_counter() - t0
            if n >= images:
                break
        del it  # workers shut down here, after the clock (timed to the last batch received)
    return {"images_per_s": n / seconds, "images": n, "seconds": seconds, "batches": batches,
            "short_batches": short, "kept_fraction": n / max(candidates, 1), "next_epoch": epoch}


def time_peer(loader, images: int) -> dict[str, Any]:
    n = batches = 0
    seconds = 0.0
    t0 = time.perf_counter()
    it = iter(loader)
    for x, y in it:
        touch(x, y)
        n += len(y)
        batches += 1
        seconds = time.perf_counter() - t0
        if n >= images:
            break
    del it  # as in time_ours: timed to the last batch received
    return {"images_per_s": n / seconds, "images": n, "seconds": seconds, "batches": batches}


def rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()
            if k != "next_epoch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=DEFAULT_STORE,
                    help=f"store with features (default {DEFAULT_STORE}, built if missing)")
    ap.add_argument("--imagefolder", default=str(DEFAULT_FOLDER),
                    help="the JPEG folder the store was ingested from (peer C reads it)")
    ap.add_argument("--images", type=int,
                    help="images per measured pass (default: 160000, several epochs: a pass of "
                    ">= 10 s per loader is long enough to be stable)")
    ap.add_argument("--repeats", type=int, default=5, help="measured passes of each loader (default: 5)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured passes of each loader first")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--point", default=",".join(str(x) for x in DEFAULT_POINT),
                    help="the sampler as 10 comma-separated coordinates in [0,1] "
                    "(e1,e2,e3,v0..v4,c1,c2 as in pipeline.sampler.function.Sampler.from_point)")
    ap.add_argument("--transform", default="cgf", choices=("cgf", "cdf"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args()
    if args.repeats < 1 or args.batch_size < 1 or args.workers < 0 or (args.images or 1) < 1:
        ap.error("--repeats, --batch-size and --images must be positive, --workers >= 0")

    from swift_sampler.pipeline.sampler.function import Sampler
    from swift_sampler.pipeline.sampler.table_store import load_tables
    from swift_sampler.train.sampling import create_sampler_hook

    # The main process only receives batches; leave the cores to the workers.
    torch.set_num_threads(1)
    built = prepare_store(args.store, args.imagefolder, default=args.store == DEFAULT_STORE)
    z = np.array([float(x) for x in args.point.split(",")])
    sampler = Sampler.from_point(z, load_tables(args.store), args.transform)
    pin_memory = torch.cuda.is_available()

    t0 = time.perf_counter()
    hook = create_sampler_hook(args.store, sampler, features="store", seed=args.seed)
    hook_s = time.perf_counter() - t0
    loader_a, ds_a = create_ours(args.store, None, batch_size=args.batch_size,
                                 workers=args.workers, pin_memory=pin_memory, seed=args.seed)
    loader_b, ds_b = create_ours(args.store, hook, batch_size=args.batch_size,
                                 workers=args.workers, pin_memory=pin_memory, seed=args.seed)
    epoch_images = ds_a.steps_per_epoch() * args.batch_size
    images = args.images or 160000
    weights, sources, zero_crops = image_weights(args.store, sampler)
    t0 = time.perf_counter()
    loader_c = create_peer(args.imagefolder, weights, sources, batch_size=args.batch_size,
                           workers=args.workers, pin_memory=pin_memory, images=images,
                           seed=args.seed)
    peer_setup_s = time.perf_counter() - t0

    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": [], "C": []}
    epoch = {"A": 0, "B": 0}
    for r in range(args.warmup + args.repeats):
        measured = r >= args.warmup
        for name in ("A", "B", "C"):
            if name == "C":
                res = time_peer(loader_c, images)
            else:
                loader, ds = (loader_a, ds_a) if name == "A" else (loader_b, ds_b)
                res = time_ours(loader, ds, images, epoch[name])
                epoch[name] = res["next_epoch"]
            log(f"{'run' if measured else 'warm-up'} {r - args.warmup if measured else r} "
                f"{name}: {res['images_per_s']:.0f} images/s ({res['images']} in "
                f"{res['seconds']:.2f} s)")
            if measured:
                runs[name].append(rounded(res))

    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in runs.items()}
    per_round = [{"B/A": round(b["images_per_s"] / a["images_per_s"], 4),
                  "B/C": round(b["images_per_s"] / c["images_per_s"], 4)}
                 for a, b, c in zip(runs["A"], runs["B"], runs["C"])]
    ratio_ba = med["B"] / med["A"]
    ratio_bc = med["B"] / med["C"]
    result = {
        "bench": "sampler_loader",
        "store": str(Path(args.store).resolve()), "imagefolder": args.imagefolder,
        "store_built": built, "train_images": ds_a.num_samples, "epoch_images": epoch_images,
        "images_per_pass": images, "batch_size": args.batch_size, "workers": args.workers,
        "repeats": args.repeats, "warmup": args.warmup, "pin_memory": pin_memory,
        "sampler": {"point": z.tolist(), "transform": args.transform,
                    **{k: round(v, 4) for k, v in sampler.parameters().items()}},
        "stored_crops_tau_zero_fraction": round(zero_crops, 4),
        "peer_weights": {"images_weight_zero": int(np.sum(weights == 0)),
                         "mean": round(float(weights.mean()), 4)},
        "setup_s": {"sampler_hook": round(hook_s, 3), "peer_imagefolder": round(peer_setup_s, 3)},
        "runs": runs,
        "median_images_per_s": {"A_uniform": round(med["A"], 1), "B_filtered": round(med["B"], 1),
                                "C_imagefolder_weighted": round(med["C"], 1)},
        "ratios_per_round": per_round,
        "B_over_A": round(ratio_ba, 4), "B_over_C": round(ratio_bc, 4),
        "B_over_A_median_of_rounds": statistics.median(p["B/A"] for p in per_round),
        "B_over_C_median_of_rounds": statistics.median(p["B/C"] for p in per_round),
        "targets": {"B_over_A": TARGET_B_OVER_A, "B_over_C": TARGET_B_OVER_C},
        "meets_B_over_A": ratio_ba >= TARGET_B_OVER_A,
        "meets_B_over_C": ratio_bc >= TARGET_B_OVER_C,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    "nice": os.nice(0), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
