"""The search's initial-design shapes trained to the full horizon on one benchmark seed.

The search judges its design shapes (uniform, keep-the-lower ``t`` steps, a ramp) by a short
inner loop. Where that loop cannot resolve them, this says what each shape would have given
had it been trained like every benchmark method: the same recipe, seed and sampler stage as
the ``ss`` row, on the seed folder of an earlier ``bench/noisy_cifar.py`` run (its noisy store,
its features and the tables of its feature pair). Prints one JSON line per shape (val top-1 on
the noisy labels, the only score a choice may use, and clean-test top-1) and a summary line.

    python bench/bench_design_shapes.py --out results/converge-random1 --preset cpu-converge \\
        --labels ../shared/datasets/cifar10n/random1.csv --shapes step-0.5,step-0.7,step-0.85
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.config import resolve_bench  # noqa: E402
from benchlib.context import SeedRun  # noqa: E402
from benchlib.ss import _sampler_hook  # noqa: E402
from swift_sampler.pipeline.sampler.function import Sampler  # noqa: E402
from swift_sampler.pipeline.sampler.pair import noisy_end  # noqa: E402
from swift_sampler.pipeline.sampler.table_store import load_tables  # noqa: E402


def shape(name: str, tables, transform: str = "cgf") -> Sampler:
    """``step-C``: keep the crops with ``t`` below C (the design's steps at any cut)."""
    kind, _, cut = name.partition("-")
    if kind != "step" or not cut:
        raise SystemExit(f"unknown shape {name!r}: use step-C, e.g. step-0.7")
    c = float(cut)
    if not 0 < c < 1:
        raise SystemExit(f"a step's cut must be in (0, 1), got {c}")
    c1 = float(noisy_end(tables.pair.features[0]))
    return Sampler((0.0, c, c, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0), c1, 0.0, transform, tables)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder of an earlier noisy_cifar run")
    p.add_argument("--preset", default="cpu-converge", help="its preset (default: %(default)s)")
    p.add_argument("--labels", default=None, help="its label file, if any (default: none)")
    p.add_argument("--noise", default=None, help="its noise, if not the preset's (default: none)")
    p.add_argument("--seed", type=int, default=0, help="the seed folder (default: %(default)s)")
    p.add_argument("--shapes", default="step-0.5,step-0.7", help="comma-separated (default: %(default)s)")
    args = p.parse_args(argv)
    config = resolve_bench("", args.out, preset=args.preset, labels=args.labels, noise=args.noise)
    folder = Path(args.out) / f"seed-{args.seed}"
    if not (folder / "noisy" / "tables").is_dir():
        raise SystemExit(f"{folder}/noisy has no tables: run bench/noisy_cifar.py with ss there first")
    run = SeedRun(config, args.seed, folder, folder / "noisy", folder / "clean")
    tables = load_tables(run.noisy)
    rows = []
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        t0 = time.perf_counter()
        model, summary = run.train(f"design-{name}", hook=_sampler_hook(run, shape(name, tables)))
        row = {"shape": name, "pair": str(tables.pair), **run.scores(model),
               "kept_fraction": summary.get("kept_fraction"),
               "flipped_kept_share": summary.get("flipped_kept_share"),
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    uniform = run.scores(run.w_share()[0])
    print(json.dumps({"bench": "design-shapes", "out": str(args.out), "seed": args.seed,
                      "uniform": uniform, "shapes": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
