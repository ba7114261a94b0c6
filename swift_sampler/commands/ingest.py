"""``swift-sampler pipeline ingest``: images -> a store of WebDataset shards."""

from __future__ import annotations

from ..cli import add_json_flag, emit


def register(sub, groups) -> None:
    p = groups["pipeline"].add_parser(
        "ingest",
        help="ingest images into a store (WebDataset shards, samples.parquet, manifest.json)",
        description="Ingest a labelled image source into a store: seeded stratified "
        "train/val/test splits, optional synthetic label noise on train and val, WebDataset "
        "shards. Corrupt images are skipped and named in the manifest.",
    )
    p.add_argument("--source", required=True,
                   help="imagefolder:DIR (one subfolder per class, or a flat folder of images "
                   "with --labels), digits, or "
                   "torchvision:cifar10|cifar100 (downloads when online)")
    p.add_argument("--store", required=True, help="store directory to create")
    p.add_argument("--test-source", default=None,
                   help="separate test set (e.g. imagefolder:DIR); needs --test-frac 0 (default: none)")
    p.add_argument("--val-frac", type=float, default=0.1, help="per-class val fraction (default: %(default)s)")
    p.add_argument("--test-frac", type=float, default=None,
                   help="per-class test fraction (default: 0.1, or 0 with --test-source)")
    p.add_argument("--noise", default="none",
                   help="none | symmetric:R | asymmetric:R, on train and val only (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="keep a seeded stratified subset of N source images (default: all)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="CSV or Parquet `path,label` (path relative to the imagefolder root, label a "
                   "class name) whose labels replace the source's for train and val; the source's "
                   "stay for diagnostics and the test split. Every image needs a row. For a flat "
                   "folder (no class subfolders) the file gives the classes and every label (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of subset, splits, shuffle, noise (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store that already holds data (its runs and searches too)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from swift_sampler.pipeline.ingest.build import ingest

    test_frac = args.test_frac if args.test_frac is not None else (0.0 if args.test_source else 0.1)
    summary = ingest(args.source, args.store, val_frac=args.val_frac, test_frac=test_frac,
                     test_source=args.test_source, noise=args.noise, seed=args.seed,
                     labels=args.labels,
                     limit=args.limit, shard_size=args.shard_size, overwrite=args.overwrite,
                     progress=not args.json)
    emit({"command": "pipeline ingest", **summary}, args, format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items())
    realised = ", ".join(f"{k} {v:.2%}" for k, v in s["noise"]["realised"].items() if k != "test")
    lines = [
        f"store     {s['store']} (id {s['store_id']})",
        f"source    {s['source']}" + (f", test from {s['test_source']}" if s["test_source"] else ""),
        f"samples   {counts} ({s['classes']} classes)",
        f"noise     {s['noise']['spec']}" + (f" (realised: {realised})" if realised and
                                             s["noise"]["spec"] != "none" else ""),
        f"shards    {s['shards']} files, {s['bytes'] / 1e6:.1f} MB",
        f"skipped   {s['skipped']} unreadable image(s)"
        + (" (named in manifest.json 'skipped')" if s["skipped"] else ""),
        f"time      {s['seconds']:.1f} s ({s['images_per_s']} images/s)",
    ]
    return "\n".join(lines)
