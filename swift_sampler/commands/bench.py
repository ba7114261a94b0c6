"""``swift-sampler bench noisy-cifar`` (also ``bench/noisy_cifar.py``): SS against peers.

The benchmark is not part of the installed library: its code lives in ``bench/benchlib`` of a
checkout of the repository (with cleanlab behind it, the ``bench`` extra). This command finds
it there; from a plain installation it says where to get it.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import sys
from pathlib import Path

from ..cli import UserError, add_json_flag, emit

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def benchlib(module: str = ""):
    """``benchlib`` (or its ``module``): the one on ``sys.path`` (``python bench/noisy_cifar.py``
    puts its own folder there, whatever installation of the package it runs against), else the
    one of the checkout this package was installed from in editable mode."""
    if importlib.util.find_spec("benchlib") is None and \
            not (BENCH_DIR / "benchlib" / "__init__.py").is_file():
        raise UserError("the benchmark is not installed with the package: it lives in bench/ of "
                        "a checkout of the swift-sampler repository; run it there with "
                        "`python bench/noisy_cifar.py` (after `pip install -e '.[bench]'`)")
    if importlib.util.find_spec("benchlib") is None:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module("benchlib" + (f".{module}" if module else ""))


def register(sub, groups) -> None:
    try:
        config = benchlib("config")  # the light part: the list of methods and presets
        METHODS, PRESETS = config.METHODS, config.PRESETS
    except UserError:  # a plain installation: the command is listed and explains itself
        METHODS, PRESETS = ("(from a checkout)",), {"cpu-quick": None}

    p = groups["bench"].add_parser(
        "noisy-cifar",
        help="uniform vs Swift Sampler vs peers (clean, oracle-mask, small-loss, small-loss-gmm, "
        "co-teaching, cleanlab) on one budget (from a checkout: bench/benchlib)",
        description="Carve a clean test split and a noisy train/val split from an image folder, "
        "train the same model with the same recipe and steps under each method, and report "
        "clean-test top-1 (mean ± std over seeds), the recovered share of the uniform -> "
        "oracle-mask and uniform -> clean gaps, search cost and wall times in OUT/results.json "
        "and OUT/results.md, with the paper's figures in OUT/figures. Resumable: the same "
        "command again skips finished methods and resumes the rest.",
    )
    p.add_argument("--data", default="../shared/datasets/cifar10/train",
                   help="image folder with one sub-folder per class (default: ../shared/datasets/cifar10/train)")
    p.add_argument("--out", default="results/noisy-cifar", help="results folder (default: results/noisy-cifar)")
    p.add_argument("--noise", default=None,
                   help="label noise on train and val: symmetric:R, asymmetric:R or 0 (default: "
                        "symmetric:0.4; none with --labels)")
    p.add_argument("--preset", default="cpu-quick", choices=sorted(PRESETS),
                   help="cpu-quick (tiny-cnn, 12 epochs, ~1 h on 2 cores), cpu-converge (cnn-fc "
                   "trained to convergence, 40 epochs: uniform fits the noise; ~1 h per method and "
                   "seed), paper (ResNet-18, the paper's recipe, GPU), tiny (seconds, for tests) "
                   "(default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, or all: {','.join(METHODS)} (default: all but "
                   "uniform-stage and the ss ablations)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (data, noise, init, search); mean ± std (default: 1)")
    p.add_argument("--verify-ranks", type=int, default=None, metavar="M",
                   help="retrain the last M samplers of the ss search from scratch; report SR and TR (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="search trials E_o (default: the preset's)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="E_f (default: the preset's)")
    p.add_argument("--finetune-lr-fraction", type=float, default=None, metavar="F",
                   help="fine-tune peak lr as a fraction of the training lr (default: the preset's)")
    p.add_argument("--finetune-repeats", type=int, default=None, metavar="R",
                   help="fine-tunes per search trial, scores averaged (default: 1)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="label file for train and val instead of injected noise (CSV/Parquet "
                   "path,label, e.g. ../shared/datasets/cifar10n/random1.csv); the test split stays clean (default: none)")
    p.add_argument("--trial-seeds", default=None, choices=("distinct", "common"),
                   help="seeds of the search trials (default: the preset's)")
    p.add_argument("--inner-start", default=None, choices=("final", "early", "scratch"),
                   help="where a search trial starts: w_share's end, its early checkpoint, or scratch "
                   "(default: the preset's)")
    p.add_argument("--inner-score", default=None, choices=("top1", "prob"),
                   help="what a search trial scores on val: top-1 or mean label probability "
                   "(default: the preset's)")
    p.add_argument("--no-guard", dest="guard", action="store_const", const=False, default=None,
                   help="recommend the best posterior mean without re-checking it against uniform")
    p.add_argument("--guard", dest="guard", action="store_const", const=True,
                   help="re-check the best samplers against uniform before retraining (the "
                   "default of every preset but cpu-converge, where the full-run check decides)")
    p.add_argument("--no-confirm", dest="confirm", action="store_const", const=False, default=None,
                   help="report the retrained sampler even when its full run does not beat "
                        "w_share on val")
    p.add_argument("--guard-candidates", type=int, default=None, help="candidates the guard re-evaluates (default: the preset's)")
    p.add_argument("--guard-repeats", type=int, default=None, help="seeds of the guard and noise trials (default: the preset's)")
    p.add_argument("--guard-inner-loop", default=None, choices=("search", "final", "early", "scratch"),
                   help="how the guard compares its candidates with uniform: a start of its own, "
                   "early (w_share's run resumed --finetune-epochs before its end), or search (the "
                   "search's inner loop); a finished search is guarded again (default: the preset's)")
    p.add_argument("--sampler-features", default=None, choices=("store", "image"),
                   help="where the ss methods' sampler stage finds tau: image (fresh crops, the "
                   "image's mean stored tau) or store (stored crops, per-crop tau) (default: image)")
    p.add_argument("--features-pair", default=None, metavar="F1,F2[:class]",
                   help="the two features the ss methods' sampler combines (default: "
                   "loss,entropy_r, the paper's; e.g. loss_mean,loss for the loss averaged over "
                   "w_share's run and its final loss; ':class' takes the cdf within each label)")
    p.add_argument("--selection", default=None, choices=("systematic", "es"),
                   help="the sampler stage's keep rule for every method that filters (default: "
                   "systematic; es: each crop drawn on its own, the rule of earlier results)")
    p.add_argument("--limit", type=int, default=None, help="images taken from --data (default: the preset's)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="per-class share of the images for val, the split every choice is made on "
                   "(default: the preset's; cpu-quick: 5/35, i.e. 5,000 of 35,000)")
    p.add_argument("--test-frac", type=float, default=None,
                   help="per-class share of the images for the clean test split (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every method (default: the preset's)")
    p.add_argument("--cleanlab-folds", type=int, default=None, help="k of cleanlab's cross-validation (default: the preset's)")
    p.add_argument("--crops-per-image", type=int, default=None, help="K crops scored per image (default: the preset's)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write results.json/.md from the methods of --methods already "
                   "finished in --out, on the seeds run so far (e.g. after stopping a run)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    lib = benchlib()
    resolve_bench, run_benchmark = lib.resolve_bench, lib.run_benchmark

    config = resolve_bench(
        args.data, args.out, preset="tiny" if args.tiny else args.preset, noise=args.noise,
        methods=args.methods, seeds=args.seeds, verify_ranks=args.verify_ranks, steps=args.steps,
        finetune_epochs=args.finetune_epochs, finetune_lr_fraction=args.finetune_lr_fraction,
        finetune_repeats=args.finetune_repeats, trial_seeds=args.trial_seeds, labels=args.labels,
        inner_start=args.inner_start, inner_score=args.inner_score, guard=args.guard,
        guard_candidates=args.guard_candidates, guard_repeats=args.guard_repeats,
        guard_inner_loop=args.guard_inner_loop, confirm=args.confirm, selection=args.selection,
        sampler_features=args.sampler_features, features_pair=args.features_pair, limit=args.limit, val_frac=args.val_frac,
        test_frac=args.test_frac, epochs=args.epochs,
        cleanlab_folds=args.cleanlab_folds, crops_per_image=args.crops_per_image,
        workers=args.workers, progress=False if (args.no_progress or args.json) else None)
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    command = _command_line()
    summary = run_benchmark(config, log=log, command=command, report_only=args.report_only)
    text = open(summary["table"]).read()
    emit({"command": "bench noisy-cifar", **summary}, args, text)
    return 0


def _command_line() -> str:
    """How this run was started, for results.md (the script or the CLI)."""
    argv = [shlex.quote(a) for a in sys.argv]
    if argv and argv[0].endswith(".py"):
        return " ".join(["python", *argv])
    return " ".join(["swift-sampler", *argv[1:]])
