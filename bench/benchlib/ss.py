"""Swift Sampler in the benchmark: search on the noisy val split, retrain from scratch.

``swift_sampler(run, "ss")`` runs Algorithm 1 (GP-UCB, T = cgf) from ``w_share`` with the
store's features, then trains the benchmark's recipe from scratch with the best sampler in the
2x oversample-and-filter stage (unless the guard chose the uniform sampler: then the result is
``w_share``'s, as the library returns it, and nothing is retrained). ``ss-cdf`` (T = cdf) and
``ss-random`` (random agent) are the paper's ablations (Fig. 3). The search is ``STORE/searches/NAME`` with NAME from
``BenchConfig.search_name`` (method and fine-tune recipe, e.g. ``ss-e3-lr0.5``), resumable like
``swift-sampler search run`` (same settings, so either can resume the other). The retraining
run is named after the search and its best trial, so a longer search that finds another best
sampler trains anew instead of reusing a run of the old one.

``verify_ranks(run, m)`` is the inner-loop check of the paper's (arXiv 2410.05578) appendix A.1.1: the last ``m``
samplers of the ``ss`` search are trained from scratch; SR is Spearman's rank correlation of
their fine-tune scores with their from-scratch val scores, TR the from-scratch rank of the
fine-tune top-1. Only val scores enter; the test split is not looked at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from swift_sampler.pipeline.sampler.file import load_sampler
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage.errors import UsageError

from .config import SEARCHES
from .context import SeedRun


def _sampler_hook(run: SeedRun, sampler: Sampler):
    from swift_sampler.train.sampling import create_sampler_hook

    return create_sampler_hook(run.noisy, sampler, features=run.config.sampler_features, seed=run.seed,
                               selection=run.config.selection)


def run_search(run: SeedRun, name: str, agent: str, transform: str) -> dict[str, Any]:
    """Run (or resume, or extend) search ``name``; return ``search.run.search``'s summary."""
    from swift_sampler.search.loop import GuardSettings, read_trials
    from swift_sampler.search.objective import InnerLoopSettings
    from swift_sampler.search.run import search

    c = run.config
    held = [t for t in read_trials(_search_folder(run, name) / "trials.parquet") if t["phase"] == "search"]
    if len(held) > c.steps:  # its best and its cost would then count different trials
        raise UsageError(f"search {name!r} of {run.noisy} already holds {len(held)} trials, more "
                         f"than --steps {c.steps}; pass --steps {len(held)} or more, or another --out")
    run.ensure_features()

    def on_trial(row: dict[str, Any], progress: dict[str, Any]) -> None:
        best = progress["best"]["score"] if progress["best"] else float("nan")
        run.log(f"  {name} trial {row['trial']} ({row['phase']}, {progress['remaining']} to go): "
                f"val {row['score']:.2%} "
                f"(best {best:.2%}, kept {row['kept_fraction']:.0%}, {row['seconds']:.0f}s, "
                f"ETA {progress['eta_s'] / 60:.0f} min)")

    return search(run.noisy, run.checkpoint("uniform"), name=name, steps=c.steps, agent=agent,
                  transform=transform, seed=run.seed,
                  finetune=InnerLoopSettings(epochs=c.finetune_epochs, lr_fraction=c.finetune_lr_fraction,
                                            repeats=c.finetune_repeats, start=c.inner_start,
                                            score=c.inner_score, selection=c.selection,
                                            features=c.sampler_features),
                  trial_seeds=c.trial_seeds,
                  guard=GuardSettings(enabled=c.guard, candidates=c.guard_candidates,
                                      repeats=c.guard_repeats, inner_loop=c.guard_inner_loop),
                  workers=c.workers, on_trial=on_trial)


def swift_sampler(run: SeedRun, method: str) -> dict[str, Any]:
    """Search (``SEARCHES[method]``), then train from scratch with the best sampler."""
    _, agent, transform = SEARCHES[method]
    name = run.config.search_name(method)
    found = run_search(run, name, agent, transform)
    sampler, _ = load_sampler(found["best_sampler"])
    epochs = run.config.epochs
    if found["choice"] == "uniform":
        # What the library hands a user then: the uniform sampler with w_share, its full run,
        # so nothing is retrained (``search.run._model_to_use``).
        retrain, retrained = "uniform", 0.0
        model, summary = run.w_share()
        scores, confirm, seconds = run.scores(model), None, found["trial_seconds"]
    else:
        retrain, retrained = f"{name}-t{found['best_trial']:03d}", 1.0
        model, summary = run.train(retrain, hook=_sampler_hook(run, sampler))
        scores, confirm = run.scores(model), None
        if run.config.confirm:
            scores, confirm = _confirm(run, scores, model)
        seconds = found["trial_seconds"] + run.seconds(f"run:{retrain}")
    return {**scores, "confirm": confirm, "seconds": round(seconds, 2),
            "search_settings": run.config.search_settings(), "run": retrain,
            "train_runs": retrained + found["epochs"] / epochs,
            "search_epochs": found["epochs"], "search_cost_runs": found["epochs"] / epochs,
            "search": {k: found.get(k) for k in ("search", "trials", "search_trials", "failed",
                                                 "best_trial", "best_score", "best_sampler",
                                                 "choice", "raw_best_trial", "noise_sd")},
            "guard": found.get("guard"),
            "sampler": sampler.parameters() | {"transform": sampler.transform},
            "kept_fraction": summary.get("kept_fraction"),
            "flipped_kept_share": summary.get("flipped_kept_share")}


def _confirm(run: SeedRun, scores: dict[str, Any], model) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keep the learned sampler's model only if it beats w_share on val (noisy val labels: the
    only score a user has) by the library's rule (``search.confirm.keeps_sampler``: more than
    one standard error of the paired per-image difference); else the result is w_share's, and
    the sampler's run a diagnostic. Costs nothing extra: both runs are trained anyway."""
    from swift_sampler.search.confirm import keeps_sampler

    w_share = run.w_share()[0]
    uniform = run.scores(w_share)
    gain, se = paired_val_gain(run, w_share, model)
    kept = keeps_sampler(gain, se)
    confirm = {"kept": kept, "sampler_val_top1": scores["val_top1"],
               "uniform_val_top1": uniform["val_top1"], "sampler_test_top1": scores["test_top1"],
               "val_gain_se": se,
               "reason": (f"the learned sampler's full run scored {scores['val_top1']:.2%} on val "
                          f"against w_share's {uniform['val_top1']:.2%} (gain {100 * gain:+.2f} ± "
                          f"{100 * se:.2f} points): "
                          + ("kept" if kept else "the uniform sampler (w_share) is returned"))}
    run.log(f"[seed {run.seed}] confirm: {confirm['reason']}")
    return (scores if kept else uniform), confirm


def paired_val_gain(run: SeedRun, reference, model) -> tuple[float, float]:
    """Val top-1 of ``model`` minus ``reference``'s on the same images and its standard error
    over the images (as ``search.objective.InnerLoopObjective.paired_gain``)."""
    import numpy as np

    from swift_sampler.train.evaluate import predict

    correct = []
    for m in (reference, model):
        out = predict(run.noisy, m, "val", workers=run.config.workers)
        correct.append((out["logits"].argmax(1) == out["label"]).astype(np.float64))
    d = correct[1] - correct[0]
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def verify_ranks(run: SeedRun, m: int) -> dict[str, Any]:
    """Train the last ``m`` finished samplers of the ``ss`` search from scratch; SR and TR."""
    from swift_sampler.search.loop import read_trials
    from swift_sampler.train.evaluate import evaluate

    transform = SEARCHES["ss"][2]
    name = run.config.search_name("ss")
    folder = _search_folder(run, name)
    searched = [t for t in read_trials(folder / "trials.parquet") if t["phase"] == "search"]
    trials = [t for t in searched[: run.config.steps] if t["status"] == "ok"]
    chosen = trials[-m:]
    if len(chosen) < 2:
        raise UsageError(f"--verify-ranks needs 2 finished trials in search {name!r}, found {len(chosen)}")
    tables = load_tables(run.noisy)
    rows = []
    for t in chosen:
        sampler = Sampler.from_point(np.asarray(t["point"]), tables, transform)
        model, _ = run.train(f"verify-{name}-t{t['trial']:03d}", hook=_sampler_hook(run, sampler))
        val = evaluate(run.noisy, model, "val", workers=run.config.workers)
        rows.append({"trial": int(t["trial"]), "finetune_score": float(t["score"]),
                     "scratch_score": float(val["top1"])})
    ft = np.array([r["finetune_score"] for r in rows])
    scratch = np.array([r["scratch_score"] for r in rows])
    return {"search": name, "steps": run.config.steps, "samplers": len(rows), "rows": rows,
            **rank_agreement(ft, scratch),
            "seconds": run.seconds(*(f"run:verify-{name}-t{r['trial']:03d}" for r in rows)),
            "train_runs": float(len(rows))}


def rank_agreement(approx: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """SR: Spearman's rho of ``approx`` vs ``truth`` (None when either is constant); TR: the
    1-based rank in ``truth`` (1 = best, ties share the best rank) of ``approx``'s top item
    (the first among equals)."""
    from scipy.stats import spearmanr

    approx, truth = np.asarray(approx, float), np.asarray(truth, float)
    top = int(np.argmax(approx))
    tr = 1 + int((truth > truth[top]).sum())
    if np.ptp(approx) == 0 or np.ptp(truth) == 0:
        return {"sr": None, "tr": tr}
    return {"sr": float(spearmanr(approx, truth).statistic), "tr": tr}


def _search_folder(run: SeedRun, name: str) -> Path:
    from swift_sampler.storage import StoreLayout

    return StoreLayout(run.noisy).search(name)
