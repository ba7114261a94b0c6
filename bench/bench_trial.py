"""One search trial: its time, and the objective's noise against its spread across samplers.

    .venv/bin/python bench/bench_trial.py --store STORE --checkpoint CKPT [--seeds 2] [--epochs 5]
    .venv/bin/python bench/bench_trial.py --digits /tmp/bench-digits   # builds a digits store

For each sampler of a fixed panel (uniform, hand-made loss filters, a high-loss sampler, and
Sobol points of the search space) the objective runs once per seed. Reported (JSON, last line):

- ``noise_sd``: the pooled standard deviation of one score across seeds (same sampler): the
  objective's noise; ``noise_sd / sqrt(repeats)`` with ``--repeats``;
- ``spread_sd``: the standard deviation of the per-sampler mean scores across the panel, and
  ``signal_to_noise = spread_sd / noise_sd``; ``gap_*``: best panel mean minus uniform's;
- ``diff_noise_same_seed``: the standard deviation of the score difference of two samplers
  fine-tuned with the same seed (common random numbers), against
  ``diff_noise_independent_seeds = sqrt(2) x noise_sd``;
- ``rank_val_vs_true``: Spearman's rank correlation between the per-sampler val scores (noisy
  labels, what the search sees) and their accuracy on the original val labels (diagnostics
  only): how well the noisy val ranks samplers by what they really learn;
- with ``--scratch``: each sampler trained from scratch (w_share's recipe), test top-1, the
  Spearman correlation of fine-tune and from-scratch ranks (SR of appendix A.1.1) and the
  from-scratch rank of the fine-tune top-1 (TR);
- ``trial_seconds`` (median) and ``seconds_per_epoch``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from swift_sampler.pipeline.sampler.function import Sampler, uniform_sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.search.objective import InnerLoopObjective, InnerLoopSettings
from swift_sampler.search.space import sobol_points


def panel(tables, transform: str, n_sobol: int) -> dict[str, Sampler]:
    """Named samplers spanning good, neutral and bad choices at 40% symmetric noise."""
    def loss_only(e, v):
        # c = (1, 0): t = T(cdf(loss)); with T = cdf, t is the loss quantile itself.
        return Sampler(e, v, 1.0, 0.0, "cdf", tables)

    out = {
        "uniform": uniform_sampler(tables, transform),
        "drop-top-40%-loss": loss_only((0, 0.3, 0.59, 0.6, 1), (1, 1, 1, 0, 0)),
        "soft-loss": loss_only((0, 0.25, 0.5, 0.75, 1), (1, 1, 1, 0.3, 0)),
        "drop-top-20%-loss": loss_only((0, 0.4, 0.79, 0.8, 1), (1, 1, 1, 0, 0)),
        "keep-high-loss": loss_only((0, 0.25, 0.5, 0.75, 1), (0.05, 0.05, 0.3, 1, 1)),
    }
    for i, z in enumerate(sobol_points(n_sobol, seed=0)):
        out[f"sobol-{i}"] = Sampler.from_point(z, tables, transform)
    return out


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def build_digits(root: Path) -> tuple[Path, Path]:
    """Digits with 40% symmetric noise, w_share (the digits preset) and its features."""
    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.storage import StoreLayout, sha256_file
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import fit

    ckpt = StoreLayout(root).run("w_share") / "checkpoint.pt"
    if not (root / "features.json").is_file():
        ingest("digits", root, val_frac=0.2, test_frac=0.2, noise="symmetric:0.4", seed=0, progress=False)
        model = fit(resolve_config(root, preset="digits", name="w_share", workers=0, progress=False)).model
        build_features(root, model, checkpoint_sha256=sha256_file(ckpt), progress=False, device="cpu")
    return root, ckpt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store")
    ap.add_argument("--checkpoint")
    ap.add_argument("--digits", help="build (or reuse) a digits store here instead of --store")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-fraction", type=float, default=0.25)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sobol", type=int, default=3, help="Sobol points added to the panel")
    ap.add_argument("--only", default=None, help="comma-separated panel names to run")
    ap.add_argument("--transform", default="cgf")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--scratch", action="store_true",
                    help="also train each sampler from scratch (the checkpoint's recipe) and report "
                    "the rank agreement of fine-tune val scores with from-scratch test top-1")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.digits:
        store, ckpt = build_digits(Path(args.digits))
    else:
        store, ckpt = Path(args.store), Path(args.checkpoint)
    settings = InnerLoopSettings(epochs=args.epochs, lr=args.lr, lr_fraction=args.lr_fraction,
                                schedule=args.schedule, repeats=args.repeats)
    objective = InnerLoopObjective(store, ckpt, settings, workers=args.workers, device=args.device)
    samplers = panel(load_tables(store), args.transform, args.sobol)
    if args.only:
        samplers = {k: v for k, v in samplers.items() if k in args.only.split(",")}

    rows, seconds = [], []
    for name, sampler in samplers.items():
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            try:
                r = objective(sampler, seed)
            except Exception as e:  # e.g. the filter stage is missing: report, go on
                print(f"{name}: {e}", file=sys.stderr, flush=True)
                break
            seconds.append(time.perf_counter() - t0)
            rows.append({"sampler": name, "seed": seed, "score": r.score,
                         "true_top1": r.extra.get("true_top1", math.nan),
                         "kept_fraction": r.kept_fraction, "flipped_kept_share": r.flipped_kept_share,
                         "seconds": seconds[-1]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    names = list(dict.fromkeys(r["sampler"] for r in rows))
    by = {n: [r for r in rows if r["sampler"] == n] for n in names}
    means = {n: float(np.mean([r["score"] for r in by[n]])) for n in names}
    true_means = {n: float(np.mean([r["true_top1"] for r in by[n]])) for n in names}
    variances = [np.var([r["score"] for r in by[n]], ddof=1) for n in names if len(by[n]) > 1]
    noise = float(math.sqrt(np.mean(variances))) if variances else math.nan
    spread = float(np.std(list(means.values()), ddof=1)) if len(means) > 1 else math.nan
    # Common random numbers: the noise of a *difference* between two samplers fine-tuned with
    # the same seed, against sqrt(2) x noise_sd for independent seeds.
    full = [n for n in names if len(by[n]) == args.seeds]
    diffs = [np.var([a["score"] - b["score"] for a, b in zip(by[x], by[y])], ddof=1)
             for i, x in enumerate(full) for y in full[i + 1:]] if args.seeds > 1 else []
    diff_noise = float(math.sqrt(np.mean(diffs))) if diffs else math.nan
    result = {
        "bench": "trial", "store": str(store), "recipe": objective.describe(), "seeds": args.seeds,
        "per_sampler": {n: {"val": means[n], "true_val": true_means[n],
                            "scores": [r["score"] for r in by[n]],
                            "kept_fraction": by[n][0]["kept_fraction"],
                            "flipped_kept_share": by[n][0]["flipped_kept_share"]} for n in names},
        "noise_sd": noise, "spread_sd": spread,
        "signal_to_noise": spread / noise if noise and noise > 0 else None,
        "diff_noise_same_seed": diff_noise, "diff_noise_independent_seeds": math.sqrt(2) * noise,
        "gap_best_minus_uniform": (max(means.values()) - means["uniform"]) if "uniform" in means else None,
        "true_gap_best_minus_uniform": (max(true_means.values()) - true_means["uniform"])
        if "uniform" in true_means else None,
        "rank_val_vs_true": spearman(list(means.values()), list(true_means.values())) if len(means) > 2 else None,
        "trial_seconds": statistics.median(seconds) if seconds else None,
        "seconds_per_epoch": statistics.median(seconds) / (args.epochs * args.repeats) if seconds else None,
        "torch_threads": args.threads,
    }
    if args.scratch:
        scratch = from_scratch(store, ckpt, {n: samplers[n] for n in names}, args.seeds, args.workers)
        result["scratch_test"] = scratch
        result["rank_finetune_vs_scratch"] = spearman([means[n] for n in names], [scratch[n] for n in names])
        top = max(names, key=lambda n: means[n])
        result["top_finetune_rank_from_scratch"] = 1 + sorted(scratch.values(), reverse=True).index(scratch[top])
    print(json.dumps(result, default=float))
    return result


def from_scratch(store, ckpt, samplers: dict[str, Sampler], seeds: int, workers: int) -> dict[str, float]:
    """Mean test top-1 over ``seeds`` of training from scratch with each sampler (appendix A.1.1)."""
    from swift_sampler.train.checkpoint import load_checkpoint
    from swift_sampler.train.evaluate import evaluate
    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.sampling import create_sampler_hook
    from swift_sampler.train.trainer import fit

    recipe = load_checkpoint(ckpt)["config"]
    out = {}
    for name, sampler in samplers.items():
        accs = []
        for seed in range(seeds):
            config = resolve_config(store, preset=recipe.get("preset"), name=None, model=recipe["model"],
                                    epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                                    seed=seed, workers=workers, val_split="", progress=False)
            model = fit(config, sampler=create_sampler_hook(store, sampler, seed=seed)).model
            accs.append(evaluate(store, model, "test", workers=workers)["top1"])
        out[name] = float(np.mean(accs))
        print(json.dumps({"sampler": name, "scratch_test": accs}), file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    main()
