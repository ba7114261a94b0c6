"""``swift-sampler demo``: the whole method on the embedded digits set, no download."""

from __future__ import annotations

import sys

from ..cli import add_json_flag, emit


def register(sub, groups) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole method on scikit-learn's digits with 40%% label noise (minutes, no download)",
        description="Ingest digits with label noise (--noise, 40% symmetric by default), train uniformly (w_share), build "
        "features and tables, search a sampler with GP-UCB, retrain with it, train on clean "
        "labels, and print clean-test accuracy of uniform / SS / clean with the figure paths.",
    )
    p.add_argument("--workdir", default="demo-store", help="folder for the stores (default: %(default)s)")
    p.add_argument("--noise", default="symmetric:0.4",
                   help="label noise on train and val: none, symmetric:R or asymmetric:R (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="search trials (default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs per search trial (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoConfig, format_results, run_demo

    config = DemoConfig(workdir=args.workdir, noise=args.noise, steps=args.steps,
                        finetune_epochs=args.finetune_epochs, seed=args.seed,
                        progress=not args.json)
    log = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = run_demo(config, log=log)
    emit(summary, args, format_results(summary))
    return 0
