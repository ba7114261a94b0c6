"""``swift-sampler search run`` and ``search show``: thin layers over ``search.run_search``.

Under torchrun every rank fine-tunes; rank 0 runs the agent, writes and prints.
"""

from __future__ import annotations

import math

from ..cli import UserError, add_json_flag, emit


def register(sub, groups) -> None:
    from swift_sampler.pipeline.sampler.filter import SELECTIONS
    from swift_sampler.search.settings import (
        FEATURE_MODES,
        GUARD_INNER_LOOPS,
        SCORES,
        STARTS,
        GuardSettings,
        InnerLoopSettings,
    )

    search = groups["search"]
    p = search.add_parser(
        "run",
        help="learn a sampler: GP-UCB over the 10 parameters (resumable)",
        description="Algorithm 1 of the paper: each trial trains --finetune-epochs with the "
        "proposed sampler (by default a fresh model on w_share's recipe; --start final fine-tunes "
        "the checkpoint, as the paper does) and scores top-1 on the val split. Trials "
        "are appended to STORE/searches/NAME/trials.parquet as they finish; the same command "
        "again resumes an interrupted search. The uniform sampler is evaluated on "
        "--guard-repeats seeds to measure the score's noise; the recommendation "
        "(best_sampler.json) is the tried sampler of highest GP posterior mean, and, unless "
        "--no-guard, only if it beats the uniform sampler on common seeds by more than that "
        "noise; otherwise it is the uniform sampler. Then, unless --no-confirm, the recommended "
        "sampler is trained from scratch with w_share's recipe (STORE/runs/NAME-confirm-tNNN, "
        "one training run) and kept only if that run beats w_share on val: a short inner loop "
        "can prefer a sampler that learns fast and ends worse.",
    )
    p.add_argument("--store", required=True, help="store directory with features and tables")
    p.add_argument("--checkpoint", required=True, help="w_share: the checkpoint the features were built from")
    p.add_argument("--name", required=True, help="search name (folder STORE/searches/NAME)")
    p.add_argument("--steps", type=int, default=40, help="E_o, search trials; the noise and guard trials come on top; may "
                   "grow on resume (default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=InnerLoopSettings.epochs,
                   help="E_f, epochs per trial (default: %(default)s, the horizon at which the inner-loop "
                   "study measured the default --start scratch)")
    p.add_argument("--agent", default="gp-ucb", help="gp-ucb | random (default: %(default)s)")
    p.add_argument("--transform", default="cgf", choices=("cgf", "cdf"), help="T of the sampler (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the agent and of the trials (default: %(default)s)")
    p.add_argument("--trial-seeds", default="common", choices=("distinct", "common"),
                   help="common: every trial uses --seed (common random numbers: same data order, "
                   "augmentation and filter keys); distinct: trial n uses --seed + n (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="peak lr of a trial (default: w_share's; with --start final, "
                   "--lr-fraction x w_share's)")
    p.add_argument("--lr-fraction", type=float, default=None,
                   help="--start final only: fine-tune peak lr as a fraction of the checkpoint's "
                   f"(default: {InnerLoopSettings.lr_fraction})")
    p.add_argument("--schedule", default=None,
                   help="--start final only: fine-tune schedule; other starts follow w_share's "
                   f"(default: {InnerLoopSettings.schedule})")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the checkpoint's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="trials per proposal with different seeds, scores averaged "
                   f"(default: {InnerLoopSettings.repeats})")
    p.add_argument("--start", default=None, choices=STARTS,
                   help=f"where a trial starts (default: {InnerLoopSettings.start}): scratch (a fresh model trained "
                   "--finetune-epochs on w_share's recipe), early (w_share's own run resumed "
                   "--finetune-epochs before its end, continuing its schedule; needs the checkpoints "
                   "`train` keeps of its last epochs), final (w_share's checkpoint, the paper's "
                   "fine-tune)")
    p.add_argument("--score", default=None, choices=SCORES,
                   help="what a trial scores on val: top1, or prob (mean probability of the label) "
                   f"(default: {InnerLoopSettings.score})")
    p.add_argument("--features", default=None, choices=FEATURE_MODES,
                   help="where the filter finds crop features: image (fresh crops with their "
                   "image's mean stored tau), store (stored crops replayed with their own "
                   "features) or online; recorded in the sampler file, which `train` follows "
                   f"(default: {InnerLoopSettings.features})")
    p.add_argument("--selection", default=None, choices=SELECTIONS,
                   help="how the filter keeps half of the candidates: systematic (the two "
                   "crops of an image drawn together, every image once per epoch when tau is "
                   "flat) or es (each crop on its own, Efraimidis-Spirakis keys) "
                   f"(default: {InnerLoopSettings.selection})")
    p.add_argument("--no-guard", dest="guard", action="store_false",
                   help="recommend the best posterior mean without re-checking it against uniform")
    p.add_argument("--guard-candidates", type=int, default=GuardSettings.candidates,
                   help="candidates (by posterior mean) the guard re-evaluates (default: %(default)s)")
    p.add_argument("--guard-repeats", type=int, default=GuardSettings.repeats,
                   help="seeds on which uniform and the candidates are compared; also measures "
                   "the noise (default: %(default)s)")
    p.add_argument("--guard-inner-loop", default=GuardSettings.inner_loop, choices=GUARD_INNER_LOOPS,
                   help="how the guard compares the candidates with uniform: a --start of its own, "
                   "early (w_share's run resumed --finetune-epochs before its end: no "
                   "short-horizon bias toward filters that learn fast; needs the checkpoints "
                   "`train` keeps of its last epochs), or search (the search's inner loop). May "
                   "change when a finished search is resumed: the guard runs again (default: %(default)s)")
    p.add_argument("--no-confirm", dest="confirm", action="store_false",
                   help="skip the full-run check (the recommendation is then the guard's, "
                   "checked at the inner loop's horizon only)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if present)")
    add_json_flag(p)
    p.set_defaults(func=run_search_command)

    s = search.add_parser("show", help="print the trials of a search",
                          description="The trials of STORE/searches/NAME as a table (from the "
                          "DuckDB view `trials`), then a JSON summary line.")
    s.add_argument("--store", required=True, help="store directory")
    s.add_argument("name", help="search name (folder STORE/searches/NAME)")
    add_json_flag(s)
    s.set_defaults(func=show_search_command)


def run_search_command(args) -> int:
    import dataclasses

    from swift_sampler.search.agents import AGENTS
    from swift_sampler.search.loop import GuardSettings
    from swift_sampler.search.objective import InnerLoopSettings
    from swift_sampler.search.run import search
    from swift_sampler.storage import StoreLayout, check_name
    from swift_sampler.train.distributed import broadcast_object, init_distributed, shutdown

    if args.agent not in AGENTS:
        raise UserError(f"unknown agent {args.agent!r}; choose one of: {', '.join(sorted(AGENTS))}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    check_name(args.name, "search name")
    StoreLayout(args.store).require()
    given = dict(epochs=args.finetune_epochs, lr=args.finetune_lr, lr_fraction=args.lr_fraction,
                 schedule=args.schedule, batch_size=args.batch_size, repeats=args.repeats,
                 features=args.features, start=args.start, score=args.score,
                 selection=args.selection)
    settings = dataclasses.replace(InnerLoopSettings(), **{k: v for k, v in given.items() if v is not None})
    ignored = [flag for flag, value in (("--lr-fraction", args.lr_fraction),
                                        ("--schedule", args.schedule)) if value is not None]
    if ignored and settings.start != "final":
        # A scratch or early trial follows w_share's own schedule and peak lr (or --finetune-lr).
        raise UserError(f"{' and '.join(ignored)} only shape the fine-tune of --start final; "
                        f"--start {settings.start} follows w_share's own schedule: drop them, or "
                        "pass --start final")
    try:
        guard = GuardSettings(enabled=args.guard, candidates=args.guard_candidates,
                              repeats=args.guard_repeats, inner_loop=args.guard_inner_loop).check()
    except ValueError as e:
        raise UserError(str(e)) from None
    dist = init_distributed(args.device)
    try:
        table = _LiveTable(args.steps, enabled=dist.is_main and not args.json)
        summary = search(
            args.store, args.checkpoint, name=args.name, steps=args.steps, agent=args.agent,
            transform=args.transform, seed=args.seed, finetune=settings,
            trial_seeds=args.trial_seeds, guard=guard, workers=args.workers, device=args.device,
            confirm=args.confirm, progress=not args.json, on_trial=table.row,
            announce=(lambda line: print(line, flush=True)) if table.enabled else None, is_main=dist.is_main,
            broadcast=lambda obj: broadcast_object(obj, dist))
    finally:
        shutdown()
    if dist.is_main:
        # A search that already holds more trials than --steps runs none and reports them all.
        steps = max(args.steps, summary["search_trials"])
        emit({"command": "search run", **summary, "agent": args.agent, "transform": args.transform,
              "steps": steps}, args,
             _verdict(summary))
    return 0


def _verdict(summary: dict) -> str:
    guard = summary.get("guard") or {}
    confirm = summary.get("confirm") or {}
    why = f" ({guard['reason']})" if guard.get("reason") else ""
    if confirm and not confirm.get("kept"):
        why = f" (trial {confirm['trial']} did not pass the full-run check)"
    check = ""
    if confirm:
        check = f"\nfull-run check: {confirm['reason']}"
    if summary.get("model"):
        check += f"\nmodel to use: {summary['model']}"
    if summary.get("choice") == "uniform":
        return f"recommended: the uniform sampler{why}; sampler {summary['best_sampler']}{check}"
    return (f"recommended: trial {summary['best_trial']} ({summary.get('choice')}), val top-1 "
            f"{_pct(summary['best_score'])}{why}; sampler {summary['best_sampler']}{check}")


class _LiveTable:
    """Prints one line per finished trial (rank 0, unless --json)."""

    HEADER = f"{'trial':>5} {'score':>7} {'best':>7} {'kept':>6} {'seconds':>8} {'ETA':>9}  status  phase"

    def __init__(self, steps: int, enabled: bool) -> None:
        self.steps, self.enabled, self.started = steps, enabled, False

    def row(self, row: dict, progress: dict) -> None:
        if not self.enabled:
            return
        if not self.started:
            print(self.HEADER, flush=True)
            self.started = True
        best = progress["best"]["score"] if progress["best"] else math.nan
        print(f"{row['trial']:>5} {_pct(row['score']):>7} {_pct(best):>7} "
              f"{_pct(row['kept_fraction']):>6} {row['seconds']:>8.1f} "
              f"{_duration(progress['eta_s']):>9}  {row['status']:<6}  {row['phase']}", flush=True)


def show_search_command(args) -> int:
    from swift_sampler.search.loop import best_so_far, read_settings, summarize
    from swift_sampler.storage import StoreError, StoreLayout, check_name, query

    check_name(args.name, "search name")
    layout = StoreLayout(args.store).require()
    if not (layout.search(args.name) / "trials.parquet").is_file():
        have = sorted(p.parent.name for p in layout.searches_dir.glob("*/trials.parquet"))
        raise StoreError(f"no search {args.name!r} with trials in {layout.root} "
                         f"(searches: {', '.join(have) or 'none'})")
    # First the search's own files, each named when damaged (the query below would fail on a
    # damaged trials file too, but as the store's trials view).
    summary = {"command": "search show", **summarize(layout.root, args.name),
               "settings": read_settings(layout.root, args.name)}
    # check_name allows no quote, so the name is a safe SQL literal.
    rows = query(layout.root, f"SELECT * EXCLUDE (point) FROM trials WHERE search = '{args.name}' "
                              "ORDER BY trial").to_pylist()
    best = best_so_far(rows)
    params = ("e1", "e2", "e3", "v0", "v1", "v2", "v3", "v4", "c1", "c2")
    lines = [f"{'trial':>5} {'phase':>6} {'status':>6} {'score':>7} {'best':>7} {'kept':>6} {'flip*':>6} "
             f"{'sec':>6}  " + " ".join(f"{p:>5}" for p in params)]
    for r, b in zip(rows, best):
        lines.append(f"{r['trial']:>5} {r.get('phase') or 'search':>6} {r['status']:>6} {_pct(r['score']):>7} {_pct(b):>7} "
                     f"{_pct(r['kept_fraction']):>6} {_pct(r['flipped_kept_share']):>6} "
                     f"{r['seconds']:>6.1f}  " + " ".join(f"{r[p]:>5.2f}" for p in params))
    lines.append("best: best raw score of the search trials so far; flip*: share of flipped labels "
                 "among kept samples (diagnostics; not seen by the agent)")
    if summary["best_sampler"]:
        lines.append(_verdict(summary))
    emit(summary, args, "\n".join(lines))
    return 0


def _pct(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2%}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

