"""Benchmark build-features against the model's bare inference on the same crops.

Measured in one process, interleaved, ``--repeats`` times (medians reported):
- ``build``: ``build_features`` end to end (read shards, decode, crop, score, write Parquet),
  last-layer grad norm, tables off; crops/s;
- ``bare``: ``model(x)`` alone on the very same crops, already decoded, cropped and batched
  in memory (no_grad, eval, channels_last; bf16 autocast on GPU); crops/s;
- ``full``: ``score_batch(grad_norm="full")`` on the first ``--full-crops`` of those crops,
  and ``last``: ``score_batch(grad_norm="last-layer")`` on the same ones, to show the cost of
  the exact full gradient norm.
Target: build / bare >= 0.85 in last-layer mode.

    python bench/bench_features.py --store /tmp/digits --model digits-net --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from swift_sampler.pipeline.features.build import (
    batch_crops,
    build_features,
    make_crops,
    output_size,
    read_shard,
)
from swift_sampler.pipeline.features.scoring import score_batch
from swift_sampler.storage import StoreLayout, num_classes, read_manifest, split_shards


def load(args, manifest):
    if args.checkpoint:
        from swift_sampler.train.checkpoint import load_model

        return load_model(args.checkpoint)[0]
    from swift_sampler.train.models import create_model

    image = manifest["image"]
    size = args.image_size or image.get("height") or 32
    return create_model(args.model, num_classes(manifest), in_chans=image["channels"], image_size=size)


def crops_in_memory(layout, manifest, model, *, k, seed, batch_size):
    out_size = output_size(manifest, getattr(model, "image_size", None))
    batches = []
    for path, _ in split_shards(layout, manifest, "train"):
        src = read_shard(path, channels=manifest["image"]["channels"])
        # Per shard, exactly as build_features batches them.
        batches += list(batch_crops(make_crops(src, crops_per_image=k, seed=seed, out_size=out_size),
                                    batch_size=batch_size))
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bare(model, batches, device):
    n, t0 = 0, time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for b in batches:
            x = b["x"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            model(x)
            n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def time_build(store, model, args, device):
    # A from-scratch build each time: same-provenance parts would otherwise be kept (resume).
    layout = StoreLayout(store)
    shutil.rmtree(layout.features_dir, ignore_errors=True)
    layout.features_meta.unlink(missing_ok=True)
    sync(device)
    t0 = time.perf_counter()
    s = build_features(store, model, crops_per_image=args.crops_per_image, seed=args.seed,
                       batch_size=args.batch_size, device=device, tables=False, progress=False,
                       workers=args.workers)
    sync(device)
    return s["rows"] / (time.perf_counter() - t0)


def time_scores(model, x, y, mode, device, batch_size):
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        score_batch(model, x[i : i + batch_size], y[i : i + batch_size], grad_norm=mode, autocast=False)
    sync(device)
    return len(x) / (time.perf_counter() - t0)


# Functions whose inclusive time (cProfile's cumtime: outermost calls only) an in-process
# build is split by; nested ones are subtracted from the one that pulls them.
PROFILED = {
    "read_shard": "crop_stream.py", "make_crops": "crop_stream.py", "batch_crops": "crop_stream.py",
    "score_rows": "features.py", "_call_impl": "module.py", "assemble": "features.py",
    "_check_part": "features.py", "atomic_write_parquet": "atomic.py",
}


def profile_build(store, model, args, device) -> dict:
    """One in-process build (workers=0) under cProfile: exclusive seconds of each stage."""
    import cProfile
    import pstats

    layout = StoreLayout(store)
    shutil.rmtree(layout.features_dir, ignore_errors=True)
    layout.features_meta.unlink(missing_ok=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(build_features, store, model, crops_per_image=args.crops_per_image, seed=args.seed,
                 batch_size=args.batch_size, device=device, tables=False, progress=False, workers=0)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    cum = {name: sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == name)
           for name, file in PROFILED.items()}
    stages = {
        "read shards, decode JPEG/PNG": cum["read_shard"],
        "cut crops": cum["make_crops"] - cum["read_shard"],
        "stack batches": cum["batch_crops"] - cum["make_crops"],
        "model forward": cum["_call_impl"],
        "loss, entropy, grad norm": cum["score_rows"] - cum["_call_impl"],
        "assemble + check part": cum["assemble"] + cum["_check_part"],
        "write Parquet": cum["atomic_write_parquet"],
    }
    stages["other"] = total - sum(stages.values())
    return {"workers": 0, "seconds": round(total, 2),
            "stages": {k: {"seconds": round(v, 2), "share": round(v / total, 3)} for k, v in stages.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="a scratch store (its features/ are rebuilt)")
    p.add_argument("--checkpoint", help="checkpoint to score with (default: a fresh --model)")
    p.add_argument("--model", default="digits-net")
    p.add_argument("--image-size", type=int)
    p.add_argument("--crops-per-image", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--full-crops", type=int, default=256)
    p.add_argument("--workers", type=int, help="decoding processes (default: build_features' default)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one in-process build (workers=0) and report its stages")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args()

    layout = StoreLayout(args.store).require()
    manifest = read_manifest(layout)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args, manifest).eval().to(device).to(memory_format=torch.channels_last)
    batches = crops_in_memory(layout, manifest, model, k=args.crops_per_image, seed=args.seed,
                              batch_size=args.batch_size)
    time_bare(model, batches[:2], device)  # warm-up
    build, bare = [], []
    for _ in range(args.repeats):
        bare.append(time_bare(model, batches, device))
        build.append(time_build(args.store, model, args, device))
    ratios = [a / b for a, b in zip(build, bare)]

    x = torch.cat([b["x"] for b in batches])[: args.full_crops].to(device).contiguous(
        memory_format=torch.channels_last)
    y = torch.cat([b["label"] for b in batches])[: args.full_crops].to(device)
    last = [time_scores(model, x, y, "last-layer", device, args.batch_size) for _ in range(args.repeats)]
    full = [time_scores(model, x, y, "full", device, args.batch_size) for _ in range(args.repeats)]
    result = {
        "store": str(layout.root), "device": str(device), "model": getattr(model, "model_name", args.model),
        "parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads(),
        "crops": sum(len(b["x"]) for b in batches), "batch_size": args.batch_size, "workers": args.workers,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "build_crops_per_s": statistics.median(build), "bare_crops_per_s": statistics.median(bare),
        "build_over_bare": statistics.median(ratios), "build_over_bare_runs": ratios,
        "score_last_layer_crops_per_s": statistics.median(last),
        "score_full_crops_per_s": statistics.median(full),
        "full_slowdown": statistics.median(last) / statistics.median(full),
        "target_build_over_bare": 0.85,
    }
    if args.profile:
        result["profile"] = profile_build(args.store, model, args, device)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
