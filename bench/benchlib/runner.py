"""Run the benchmark: seeds x methods, resumable, then figures and the report.

``OUT/`` holds ``bench.json`` (the settings; a rerun with other data or training settings is
refused, one with other search settings re-runs the ss methods only),
``seed-S/{noisy,clean}`` (the stores, with runs, features and searches inside),
``seed-S/methods/METHOD.json`` (one finished method: a rerun skips it unless, for an ss
method, the search settings it recorded differ from the current ones),
``seed-S/verify-ranks.json``, ``figures/*.png``, ``results.json`` and ``results.md``.
Methods may be added on a rerun (``--methods``), and so may seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swift_sampler.storage import StoreError, atomic_write_text

from .config import SEARCH_KEYS, SEARCHES, BenchConfig, planned_work
from .context import SeedRun
from .curves import memorisation, plot_curves, seed_curves
from .methods import METHOD_FUNCTIONS
from .report import aggregate, markdown
from .stores import prepare_stores, write_json


def run_benchmark(config: BenchConfig, *, log: Callable[[str], None] = print,
                  command: str = "", report_only: bool = False) -> dict[str, Any]:
    """Run every (seed, method) not yet done; write figures, ``results.json``, ``results.md``.

    With ``report_only`` nothing is trained or ingested: the report is made from the methods
    already finished (of ``config.methods``, on the seeds that have stores), e.g. after a run
    was stopped, or to show methods run by separate commands in one table.

    Returns a summary: paths, per-method mean test top-1, seconds.
    """
    t0 = time.perf_counter()
    out = Path(config.out).resolve()
    if report_only and not (out / "bench.json").is_file():
        raise StoreError(f"{out} holds no benchmark (bench.json missing); run it first")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out / "bench.json", config, log, report_only)
    if not report_only:
        write_json(out / "bench.json", config.definition())
    seeds: dict[int, dict[str, dict[str, Any]]] = {}
    verify: dict[int, dict[str, Any]] = {}
    shared: dict[str, list[float]] = {"features": []}
    data: dict[str, Any] = {}
    runs: dict[int, SeedRun] = {}
    curves: dict[int, dict[str, Any]] = {}
    for seed in range(config.seeds):
        folder = out / f"seed-{seed}"
        if report_only and not all((folder / k / "manifest.json").is_file() for k in ("noisy", "clean")):
            continue
        log(f"[seed {seed}] data: {config.data} -> {folder}")
        stores = prepare_stores(config, folder, seed)
        if seed == 0:
            data = {"counts": stores["counts"], "noise": stores["noise"]}
            work = planned_work(config, stores["counts"])
            steps, forward = (sum(w[k] for w in work.values()) for k in ("train", "forward"))
            plan = (f"plan per seed: {steps / 1e6:.2f}M training image-steps, "
                    f"{forward / 1e6:.2f}M images scored")
            if config.model == "tiny-cnn":  # the only rates measured (two idle CPU cores)
                plan += (f"; tiny-cnn on two idle CPU cores (~900 and ~3,500 images/s) takes about "
                         f"{(steps / 900 + forward / 3500) / 60:.0f} min")
            log(plan)
        run = runs[seed] = SeedRun(config, seed, folder, stores["noisy"], stores["clean"], log=log)
        seeds[seed] = {}
        for method in config.methods:
            path = folder / "methods" / f"{method}.json"
            if report_only and not path.is_file():
                log(f"[seed {seed}] {method:<11} not run (left out of the report)")
                continue
            seeds[seed][method] = _method(run, method, path, log, report_only)
        if config.verify_ranks and report_only:
            if (folder / "verify-ranks.json").is_file():
                verify[seed] = json.loads((folder / "verify-ranks.json").read_text())
        elif config.verify_ranks:
            verify[seed] = _verify(run, config.verify_ranks, folder / "verify-ranks.json", log)
        if "features" in run.times:
            shared["features"].append(run.times["features"])
        if config.curves:
            curves[seed] = seed_curves(run)
    if not runs:
        raise StoreError(f"{out} holds no seed with stores yet; run the benchmark first")
    figures = draw_figures(runs[min(runs)], out / "figures", config.methods)
    drawn = plot_curves(curves, out / "figures" / "curves.png")
    if drawn is not None:
        figures["figures"].append(str(drawn.relative_to(out)))
    made_by = command
    if report_only and (out / "results.json").is_file():
        # The command that trained the methods stays on record; this one only re-made the report.
        made_by = json.loads((out / "results.json").read_text()).get("command") or command
    doc = aggregate(config, seeds, verify, data, shared, figures, made_by)
    if curves:
        doc["curves"] = {"per_seed": {str(k): v for k, v in curves.items()},
                         "memorisation": {str(k): {name: memorisation(c) for name, c in v.items()}
                                          for k, v in curves.items()}}
    if report_only:
        doc["report_command"] = command
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", markdown(doc))
    return {"out": str(out), "results": str(out / "results.json"), "table": str(out / "results.md"),
            "test_top1": {m: e["test_top1"]["mean"] for m, e in doc["methods"].items()},
            "figures": doc.get("figures", []), "seconds": doc["seconds"]}


def _method(run: SeedRun, method: str, path: Path, log, report_only: bool = False) -> dict[str, Any]:
    if path.is_file():
        result = json.loads(path.read_text())
        stored = result.get("search_settings")  # absent: made before settings were recorded
        same = method not in SEARCHES or (
            stored is not None and BenchConfig.with_defaults(stored) == run.config.search_settings())
        if report_only and not same:
            log(f"[seed {run.seed}] {method:<11} reported as stored, made with other search "
                f"settings ({stored}) than the current ones")
            return result
        if same:
            log(f"[seed {run.seed}] {method:<11} done before: test top-1 {result['test_top1']:.2%}")
            return result
        log(f"[seed {run.seed}] {method:<11} search settings changed since the stored result "
            f"({stored} -> {run.config.search_settings()}); running again")
    log(f"[seed {run.seed}] {method:<11} running ...")
    t0 = time.perf_counter()
    result = {"method": method, "seed": run.seed, **METHOD_FUNCTIONS[method](run)}
    result["wall_s"] = round(time.perf_counter() - t0, 1)  # this call only (shared stages too)
    write_json(path, result)
    log(f"[seed {run.seed}] {method:<11} test top-1 {result['test_top1']:.2%}  "
        f"(val {result['val_top1']:.2%}, {result['seconds'] / 60:.1f} min)")
    return result


def _verify(run: SeedRun, m: int, path: Path, log) -> dict[str, Any]:
    from .ss import verify_ranks

    if path.is_file():
        doc = json.loads(path.read_text())
        # the same search, cut at the same trial, at least as many samplers retrained
        if (doc["search"] == run.config.search_name("ss") and doc.get("steps") == run.config.steps
                and doc["samplers"] >= min(m, run.config.steps)):
            return doc
    log(f"[seed {run.seed}] verify-ranks: training the last {m} samplers of ss from scratch ...")
    doc = verify_ranks(run, m)
    write_json(path, doc)
    sr = "n/a" if doc["sr"] is None else f"{doc['sr']:.2f}"
    log(f"[seed {run.seed}] verify-ranks SR {sr}, TR {doc['tr']} ({doc['samplers']} samplers)")
    return doc


def draw_figures(run: SeedRun, folder: Path, methods: tuple[str, ...]) -> dict[str, Any]:
    """Figures 1(a), 1(b), 2(b) and 3 of seed 0 into ``folder``; paths relative to its parent.

    A figure whose inputs are missing (no features, no search) is listed in
    ``figures_missing`` with the reason, as is one whose plotting module is not installed.
    """
    from swift_sampler.storage import StoreLayout

    layout = StoreLayout(run.noisy)
    drawn: list[Path] = []
    missing: list[str] = []

    def attempt(what: str, module: str, call: Callable[[Any], Any]) -> None:
        try:
            import importlib

            mod = importlib.import_module(f"swift_sampler.figures.{module}")
        except ModuleNotFoundError as e:
            missing.append(f"{what}: module {e.name} not available")
            return
        paths = call(mod)
        drawn.extend(Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths]))

    if layout.features_meta.is_file():
        attempt("noise density (Fig. 1a)", "noise_density",
                lambda mod: mod.plot_noise_density(run.noisy, out=folder / "noise_density.png"))
    else:
        missing.append("noise density (Fig. 1a): no features (run small-loss or ss)")
    best = layout.search(run.config.search_name("ss")) / "best_sampler.json"
    if "ss" in methods and best.is_file():
        attempt("sampler (Fig. 1b, 2b)", "sampler",
                lambda mod: mod.plot_sampler(best, run.noisy, out_dir=folder))
    else:
        missing.append("sampler (Fig. 1b, 2b): no ss search")
    searched = [run.config.search_name(m) for m in SEARCHES if m in methods]
    names = [n for n in searched if (layout.search(n) / "trials.parquet").is_file()]
    if names:
        attempt("search curves (Fig. 3)", "search",
                lambda mod: mod.plot_search(run.noisy, names, out=folder / "search.png"))
    else:
        missing.append("search curves (Fig. 3): no search")
    root = folder.parent
    return {"figures": [str(p.resolve().relative_to(root)) if p.resolve().is_relative_to(root) else str(p)
                        for p in drawn],
            "figures_missing": missing}


def _check_settings(path: Path, config: BenchConfig, log: Callable[[str], None],
                    report_only: bool = False) -> None:
    """Refuse other data or training settings; report other search settings (they re-run the
    ss methods alone, in search folders of their own)."""
    if not path.is_file():
        return
    stored = BenchConfig.definition_with_defaults(json.loads(path.read_text()))
    now = json.loads(json.dumps(config.definition()))
    diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {now.get(k)!r}" for k in diff)
    if set(diff) - set(SEARCH_KEYS):
        raise StoreError(f"{path.parent} holds a benchmark with other settings ({details}); "
                         "rerun with those settings to resume it, or choose another --out")
    if diff:
        if report_only:
            log(f"search settings differ from the stored ones ({details}); the stored results are "
                "reported as they are")
            return
        log(f"search settings changed ({details}): the ss methods run again; the other methods' "
            "results are kept")
