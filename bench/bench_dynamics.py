"""What recording the training dynamics costs: the same run with and without it.

    .venv/bin/python bench/bench_dynamics.py --store STORE [--model tiny-cnn] [--epochs 2] [--repeats 3]

Trains ``--repeats`` pairs of identical named runs (same seed, recipe and data), one recording
the per-image dynamics (``record_dynamics``: the statistics from each step's logits, their
all-reduce and update at the epoch's end, the state in the checkpoint, ``dynamics.parquet``)
and one not, alternating which goes first, and reports the median wall time of each and the
throughput ratio (recording / not; the target is >= 0.97). Runs go to ``STORE/runs/bench-dyn-*``
and are removed afterwards. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time

from swift_sampler.storage import StoreLayout
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.trainer import train


def timed_run(store: str, name: str, record: bool, args) -> float:
    config = resolve_config(store, name=name, model=args.model, epochs=args.epochs,
                            batch_size=args.batch_size, lr=0.05, schedule="cosine", seed=0,
                            workers=args.workers, val_split="", progress=False,
                            record_dynamics=record)
    t0 = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - t0
    shutil.rmtree(StoreLayout(store).run(name))
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="an ingested store (its train split is used)")
    p.add_argument("--model", default="tiny-cnn")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats):
        order = (True, False) if r % 2 == 0 else (False, True)
        for record in order:
            seconds[record].append(timed_run(args.store, f"bench-dyn-{r}-{int(record)}", record, args))
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(json.dumps({"bench": "dynamics", "model": args.model, "epochs": args.epochs,
                      "repeats": args.repeats, "seconds_recording": seconds[True],
                      "seconds_without": seconds[False], "median_recording": round(on, 2),
                      "median_without": round(off, 2),
                      "throughput_ratio": round(off / on, 4), "target": 0.97}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
