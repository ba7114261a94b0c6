"""A candidate training recipe on noisy CIFAR: does uniform training fit the noise by its end?

    .venv/bin/python bench/bench_recipe.py --data ../shared/datasets/cifar10/train \\
        --store /tmp/recipe/s5k-40 --train 5000 --name fc-b32 --model cnn-fc --epochs 40 \\
        --milestones 20,30 --warmup 2 --lr 0.02 --batch 32

Ingests (once per ``--store``) ``--train`` noisy train images, 5,000 noisy val and 5,000 clean
test images, trains one uniform run with the recipe, and reports its per-epoch curve: train
loss and accuracy on the given labels, noisy-val top-1 and clean-test top-1 (a diagnostic:
nothing is chosen on it). A recipe in which uniform training memorises the noise shows the
clean-test top-1 falling after a peak while the train accuracy on the given labels climbs past
the clean share. Rerunning the same command resumes the run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib.curves import memorisation
from swift_sampler.pipeline.ingest.build import ingest
from swift_sampler.storage import StoreLayout
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.trainer import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/datasets/cifar10/train", help="image folder")
    p.add_argument("--store", required=True, help="store folder (ingested on first use)")
    p.add_argument("--name", required=True, help="run name")
    p.add_argument("--train", type=int, default=5000, help="train images (default 5000)")
    p.add_argument("--noise", default="symmetric:0.4", help="injected noise (default symmetric:0.4)")
    p.add_argument("--labels", default=None, help="a label file instead of --noise (CIFAR-10N)")
    p.add_argument("--model", default="cnn-fc")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--milestones", default="20,30", help="multistep epochs, comma-separated")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up epochs")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--augment", default="crop-flip", help="crop-flip | crop | flip | none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    store = Path(args.store)
    if not StoreLayout(store).manifest.is_file():
        n = args.train + 10000
        ingest(f"imagefolder:{Path(args.data).resolve()}", store, val_frac=5000 / n,
               test_frac=5000 / n, noise="none" if args.labels else args.noise,
               labels=args.labels, seed=0, limit=n, shard_size=5000, progress=False)
    config = resolve_config(
        str(store), name=args.name, model=args.model, epochs=args.epochs, batch_size=args.batch,
        lr=args.lr, weight_decay=args.wd, schedule="multistep",
        milestones=tuple(int(m) for m in args.milestones.split(",") if m), warmup=args.warmup,
        seed=args.seed, augment=args.augment, val_split="val", diagnostic_split="test", workers=2, progress=False,
        resume=True)
    t0 = time.perf_counter()
    summary = train(config)
    run = StoreLayout(store).run(args.name)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"bench": "recipe", "run": str(run), "recipe": vars(args),
                      "wall_s": round(time.perf_counter() - t0, 1),
                      "train_seconds": round(sum(r["seconds"] for r in rows), 1),
                      **memorisation(rows), "best_epoch": summary.get("best_epoch")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
