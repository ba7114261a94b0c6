"""``swift-sampler train`` and ``swift-sampler evaluate``: thin layers over ``train.trainer.train``
and ``train.evaluate.evaluate``. Under torchrun every rank trains; rank 0 alone prints."""

from __future__ import annotations

import os
import sys

from ..cli import UserError, add_json_flag, emit


def register(sub, groups) -> None:
    from swift_sampler.train.models import MODEL_NAMES
    from swift_sampler.train.presets import PRESETS, TrainConfig
    from swift_sampler.train.schedules import SCHEDULES

    p = sub.add_parser(
        "train",
        help="train a model on a store (writes STORE/runs/NAME)",
        description="Train on the store's train split with the sharded WebDataset loader; "
        "validate on val each epoch; write STORE/runs/NAME/{config.json, metrics.jsonl, "
        "checkpoint.pt, summary.json}. Works under torchrun --nproc-per-node N (gloo on CPU, "
        "NCCL on GPU). Presets: paper-cifar, cpu-quick, digits (default: digits for tiny "
        "images, else paper-cifar on a GPU and cpu-quick on a CPU).",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--name", required=True, help="run name (folder STORE/runs/NAME)")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="the recipe (default: digits for tiny images, else paper-cifar on a GPU and "
                   "cpu-quick on a CPU)")
    p.add_argument("--model", default=None,
                   help=f"{' | '.join(MODEL_NAMES)} (default: the preset's, or the --init "
                   "checkpoint's)")
    p.add_argument("--pretrained", action="store_true",
                   help="torchvision:<arch> only: start from torchvision's default weights, read "
                   "from torch's hub cache (TORCH_HOME) or downloaded into it (default: random init)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay (default: the preset's)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="the lr schedule (default: the preset's)")
    p.add_argument("--milestones", default=None, help="multistep epochs, comma-separated, e.g. 40 (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of init, crops and order (default: {TrainConfig.seed})")
    p.add_argument("--workers", type=int, default=None, help=f"loader workers per rank (default: {TrainConfig.workers})")
    p.add_argument("--image-size", type=int, default=None, help="crop side for large images (default: 224 for large or mixed sizes, else the images' own)")
    p.add_argument("--val-split", default=None,
                   help="split validated each epoch; its best epoch is kept as "
                   "checkpoint-best.pt (default: val)")
    p.add_argument("--diagnostic-split", default=None,
                   help="a split also scored each epoch, for the record only, e.g. a clean test "
                   "split (default: none)")
    p.add_argument("--augment", default=None, choices=("crop-flip", "crop", "flip", "none"),
                   help="training crops: pad-and-crop (random-resized for large images) and a "
                   "horizontal flip, either alone, or the plain view (default: crop-flip)")
    p.add_argument("--warmup", type=float, default=None,
                   help="linear warm-up in epochs, multistep and cosine (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if present)")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoint")
    p.add_argument("--skip-damaged", action="store_true",
                   help="train on without the samples of a damaged shard (default: stop, naming it)")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights, to fine-tune (default: none)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="write checkpoint.pt only after the last epoch")
    p.add_argument("--sampler", default=None,
                   help="train with a sampler file (best_sampler.json): 2x oversample, keep half by tau "
                   "(default: none, uniform sampling)")
    p.add_argument("--selection", default=None, choices=("systematic", "es"),
                   help="how the filter keeps half of the candidates: systematic (the two crops of "
                   "an image drawn together, every image once per epoch when tau is flat) or es "
                   "(each crop on its own) (default: the rule the sampler was searched with, as "
                   "its file records; systematic for files that do not)")
    p.add_argument("--features", default=None, choices=("store", "image", "online"),
                   help="store: candidates are stored crops with stored features; "
                   "image: fresh crops, each with its image's mean stored tau; "
                   "online: fresh crops scored by the pretrained model (--scorer or --init); "
                   "(default: what the sampler was searched with, as its file records; store "
                   "for files that do not)")
    p.add_argument("--scorer", default=None,
                   help="checkpoint that scores crops in --features online (default: --init)")
    p.add_argument("--allow-foreign-tables", action="store_true",
                   help="accept a sampler built on another store's features")
    add_json_flag(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "evaluate",
        help="top-1/top-5 of a checkpoint on a split (+ clean/flipped accuracy with noise)",
        description="Evaluate a checkpoint on a split of a store: top-1, top-5 (C > 5), loss; "
        "when the split carries injected label noise, accuracy on its clean and flipped samples.",
    )
    e.add_argument("--store", required=True, help="store directory")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt")
    e.add_argument("--split", default="test", help="train | val | test (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default: 512)")
    e.add_argument("--workers", type=int, default=2, help="loader workers (default: 2)")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if present)")
    e.add_argument("--skip-damaged", action="store_true",
                   help="score without the samples of a damaged shard (counted as lost; default: stop)")
    add_json_flag(e)
    e.set_defaults(func=run_evaluate)


def run_train(args) -> int:
    import torch

    from swift_sampler.storage import StoreLayout, read_manifest
    from swift_sampler.train.checkpoint import load_checkpoint
    from swift_sampler.train.distributed import init_distributed, shutdown
    from swift_sampler.train.presets import preset_for_store, resolve_config
    from swift_sampler.train.trainer import train

    manifest = read_manifest(StoreLayout(args.store))
    model = args.model
    if model is None and args.init:
        model = load_checkpoint(args.init)["model_name"]
    preset = args.preset
    if preset is None:
        preset = preset_for_store(manifest, torch.cuda.is_available() and args.device != "cpu")
    milestones = None
    if args.milestones:
        try:
            milestones = tuple(int(m) for m in args.milestones.split(","))
        except ValueError:
            raise UserError(f"--milestones must be comma-separated integers, got {args.milestones!r}") from None
    config = resolve_config(
        args.store, preset=preset, name=args.name, model=model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        schedule=args.schedule, milestones=milestones, seed=args.seed, workers=args.workers,
        image_size=args.image_size, val_split=args.val_split,
        diagnostic_split=args.diagnostic_split, warmup=args.warmup, augment=args.augment,
        device=args.device, pretrained=args.pretrained or None,
        resume=args.resume or None, init=args.init, skip_damaged=args.skip_damaged or None,
        save_checkpoints=False if args.no_checkpoints else None, progress=not args.json)
    dist = init_distributed(config.device)
    try:
        hook = _sampler_hook(args, config, dist.device) if args.sampler else None
        summary = train(config, sampler=hook)
    finally:
        shutdown()
    if dist.is_main:
        emit(summary, args, _format_train(summary))
    return 0


def _sampler_hook(args, config, device):
    from swift_sampler.pipeline.sampler.file import (
        check_not_all_zero,
        check_provenance,
        load_sampler,
        sampler_stage,
    )
    from swift_sampler.train.checkpoint import load_model
    from swift_sampler.train.sampling import create_sampler_hook

    sampler, provenance = load_sampler(args.sampler)
    check_provenance(provenance, args.store, allow_foreign=args.allow_foreign_tables)
    features, selection = sampler_stage(provenance, args.features, args.selection)
    scorer = None
    if features in ("store", "image"):
        check_not_all_zero(sampler, args.store)
    else:
        path = args.scorer or args.init
        if not path:
            raise UserError("--features online needs the pretrained model that scores crops: "
                            "pass --scorer CKPT (or --init CKPT)")
        scorer, _ = load_model(path)
    describe = {"file": os.path.abspath(args.sampler), "features": features,
                "parameters": sampler.parameters(), "transform": sampler.transform,
                "provenance": provenance}
    return create_sampler_hook(args.store, sampler, features=features, scorer=scorer,
                               batch_size=config.batch_size, device=device, seed=config.seed,
                               describe=describe, selection=selection)



def _format_train(s: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.2%}"

    return "\n".join([
        f"run       {s['run_dir']}",
        f"model     {s['model']}, {s['epochs']} epochs on {s['world_size']} x {s['device']}",
        f"train     loss {s['loss']:.4f}, accuracy {pct(s['accuracy'])}, "
        f"{s['images_per_s']:.0f} images/s" if s.get("loss") is not None else "train     (no new epochs)",
        f"val       accuracy {pct(s.get('val_accuracy'))}",
        *([f"sampler   kept {pct(s['kept_fraction'])} of candidates; flipped share among kept "
           f"{pct(s.get('flipped_kept_share'))}"] if s.get("kept_fraction") is not None else []),
        f"time      {s['seconds']:.1f} s; skipped {s['skipped']} corrupt sample(s)",
    ])


def run_evaluate(args) -> int:
    from swift_sampler.train.evaluate import evaluate

    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} not found")
    result = evaluate(args.store, args.checkpoint, args.split, batch_size=args.batch_size,
                      workers=args.workers, device=args.device, skip_damaged=args.skip_damaged,
                      progress=not args.json and sys.stderr.isatty())
    lost = f" ({result['lost']} samples of damaged shards LOST)" if result.get("lost") else ""
    lines = [f"{result['split']}: {result['count']} samples{lost}, top-1 {result['top1']:.2%}"
             + (f", top-5 {result['top5']:.2%}" if "top5" in result else "")
             + f", loss {result['loss']:.4f}"]
    noise = result.get("noise")
    if noise:
        lines.append(f"noise: {noise['n_flipped']} flipped / {noise['n_clean']} clean; accuracy on "
                     f"clean {noise['clean_accuracy']:.2%}, flipped (vs original label) "
                     f"{noise['flipped_true_accuracy']:.2%}, flipped label memorised "
                     f"{noise['flipped_memorised']:.2%}")
    emit({"command": "evaluate", "checkpoint": args.checkpoint, **result}, args, "\n".join(lines))
    return 0
