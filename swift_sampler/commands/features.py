"""``swift-sampler pipeline build-features``: score K crops of every training image."""

from __future__ import annotations

import contextlib
import os

from swift_sampler.pipeline.sampler.pair import (
    CDF_BY,
    CROP_FEATURES,
    DEFAULT_FEATURES,
    IMAGE_FEATURES,
)

from ..cli import UserError, add_json_flag, emit


def register(sub, groups) -> None:
    p = groups["pipeline"].add_parser(
        "build-features",
        help="score K crops of every training image (loss, E^r, grad norm) and build the tables",
        description="Score K crops of every training image with a frozen checkpoint: loss, renormed "
        "entropy E^r and gradient norm per crop, written as features/part-*.parquet, then the cdf/cgf "
        "tables. Resumable; works under torchrun (one part per shard, shards split by rank).",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a model trained on this store")
    p.add_argument("--crops-per-image", type=int, default=8, metavar="K",
                   help="crops per image; crop 0 is the plain view (default: %(default)s)")
    p.add_argument("--grad-norm", choices=("last-layer", "full"), default="last-layer",
                   help="last-layer: exact for the linear head, nearly free; "
                   "full: exact over all parameters, many times slower (default: %(default)s)")
    p.add_argument("--quantiles", type=int, help="quantile knots per table (default: the tables' default)")
    p.add_argument("--angles", type=int, help="angles of (c1, c2) for the cgf table (default: the tables' default)")
    p.add_argument("--features-pair", default=",".join(DEFAULT_FEATURES), metavar="F1,F2",
                   help="the two features the sampler combines, G = c1*cdf(F1) + c2*cdf(F2), and "
                   f"the tables are built for (default: %(default)s, the paper's). "
                   f"Per crop: {', '.join(CROP_FEATURES)}; per image, from the checkpoint run's "
                   f"training dynamics: {', '.join(IMAGE_FEATURES)}")
    p.add_argument("--cdf-by", default="global", choices=CDF_BY,
                   help="each feature's cdf over all crops (global) or among the crops "
                   "of the same given label (class: a class whose images are all hard is not "
                   "dropped wholesale) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=512, help="crops per forward pass (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace features built from another checkpoint or configuration (the "
                   "old ones stay in place until the new ones are all written and checked)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from swift_sampler.api import store_dynamics_and_tables
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.pipeline.sampler.pair import FeaturePair
    from swift_sampler.storage import StoreLayout, read_manifest, sha256_file

    pair = FeaturePair.parse(args.features_pair, args.cdf_by)  # refuse a bad pair before scoring
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} not found")
    try:
        from swift_sampler.train.checkpoint import check_classes, load_model
    except ImportError as e:
        raise UserError(f"cannot load checkpoints: {e}") from None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = None
    with contextlib.ExitStack() as stack:
        if world_size > 1:
            import torch.distributed as dist

            if torch.cuda.is_available():
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device is not None else "gloo")
            stack.callback(dist.destroy_process_group)
        model, meta = load_model(args.checkpoint)
        check_classes(meta, read_manifest(StoreLayout(args.store)), args.checkpoint)
        summary = build_features(
            args.store, model, crops_per_image=args.crops_per_image, grad_norm=args.grad_norm,
            seed=args.seed, batch_size=args.batch_size, rank=rank, world_size=world_size,
            checkpoint_sha256=sha256_file(args.checkpoint), overwrite=args.overwrite,
            image_size=meta.get("image_size"), device=device, tables=False,
            progress=not (args.no_progress or args.json))
    if rank != 0:
        return 0
    summary = {**summary, **store_dynamics_and_tables(args.store, args.checkpoint, pair=pair,
                                                      quantiles=args.quantiles, angles=args.angles)}
    summary = {"command": "pipeline build-features", "checkpoint": args.checkpoint, **summary}
    rate = summary.get("crops_per_s")
    text = (f"features: {summary['rows']} rows ({summary['images']} images x {args.crops_per_image} crops), "
            f"{summary['parts_written']} parts written, {summary['parts_skipped']} already done"
            + (f", {rate:,.0f} crops/s" if rate else "")
            + (f"; training dynamics of {summary['dynamics_epochs']} epochs"
               if summary.get("dynamics_epochs") else ""))
    emit(summary, args, text)
    return 0
