"""``results.json`` and ``results.md``: per-method accuracy over seeds, gap shares, costs, times.

Shares of the gaps are computed on the means over seeds:
``sampler gap = (m - uniform) / (oracle-mask - uniform)`` and
``full gap = (m - uniform) / (clean - uniform)``; None when a term is missing or the gap is 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .config import LEGACY_SEARCH, METHODS, BenchConfig


def spread(values: list[float | None]) -> dict[str, Any]:
    """``{"mean", "std" (sample std, None below two values), "n", "values"}``; None skipped."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def gap_share(m: float | None, low: float | None, high: float | None) -> float | None:
    """``(m - low) / (high - low)``; None when a term is missing or ``high == low``."""
    if m is None or low is None or high is None or abs(high - low) < 1e-12:
        return None
    return (m - low) / (high - low)


def paired_gap_share(seeds: dict[int, dict[str, dict[str, Any]]], m: str, low: str, high: str) -> float | None:
    """``gap_share`` of the test top-1 means over the seeds where ``m``, ``low`` and ``high`` all
    ran, so that a method run on fewer seeds than its references is compared on those seeds."""
    common = [s for s in sorted(seeds) if all(k in seeds[s] for k in (m, low, high))]
    if not common:
        return None

    def mean(k: str) -> float | None:
        return spread([seeds[s][k]["test_top1"] for s in common])["mean"]

    return gap_share(mean(m), mean(low), mean(high))


def aggregate(config: BenchConfig, seeds: dict[int, dict[str, dict[str, Any]]],
              verify: dict[int, dict[str, Any]], data: dict[str, Any], shared: dict[str, list[float]],
              figures: dict[str, Any], command: str) -> dict[str, Any]:
    """The ``results.json`` document from the per-seed method results."""
    methods: dict[str, Any] = {}
    for m in METHODS:
        rows = [seeds[s][m] for s in sorted(seeds) if m in seeds[s]]
        if not rows:
            continue
        entry = {"test_top1": spread([r["test_top1"] for r in rows]),
                 "val_top1": spread([r["val_top1"] for r in rows]),
                 "seconds": spread([r["seconds"] for r in rows]),
                 "train_runs": spread([r.get("train_runs") for r in rows])["mean"],
                 "per_seed": rows}
        if "search_cost_runs" in rows[0]:
            entry["search_cost_runs"] = spread([r["search_cost_runs"] for r in rows])["mean"]
            entry["search_epochs"] = spread([r["search_epochs"] for r in rows])["mean"]
        methods[m] = entry
    for m, e in methods.items():
        e["sampler_gap_recovered"] = paired_gap_share(seeds, m, "uniform", "oracle-mask")
        e["full_gap_recovered"] = paired_gap_share(seeds, m, "uniform", "clean")
    doc: dict[str, Any] = {"benchmark": "noisy-cifar", "command": command, "config": config.to_json(),
                           "data": data, "methods": methods,
                           "shared_seconds": {k: spread(v) for k, v in shared.items()},
                           **figures}
    if verify:
        rows = [verify[s] for s in sorted(verify)]
        doc["verify_ranks"] = {"per_seed": rows, "sr": spread([r["sr"] for r in rows]),
                               "tr": spread([r["tr"] for r in rows])}
    return doc


def _search(c: dict) -> str:
    """The search's recipe in words: trials, inner loop, seeds, score, guard."""
    c = {**LEGACY_SEARCH, **c}  # results written before these settings existed
    e = c["finetune_epochs"]
    start = {
        "final": f"{e} fine-tune epochs from w_share at {c.get('finetune_lr_fraction', 1.0):g}x the lr",
        "early": f"{e} epochs resuming w_share's run {e} epochs before its end",
        "scratch": f"{e} epochs from scratch",
    }[c["inner_start"]]
    text = (f"{c['steps']} trials x {start}{_repeats(c.get('finetune_repeats', 1))}, "
            f"{c['trial_seeds']} seeds, scored by val {c['inner_score']}")
    if c["guard"]:
        text += (f"; guard: the top {c['guard_candidates']} by posterior mean and uniform re-run "
                 f"on {c['guard_repeats']} fresh seeds")
        if c["guard_inner_loop"] != "search":
            text += f", by the {c['guard_inner_loop']} inner loop"
    if c["confirm"]:
        text += ("; the retrained sampler kept only if its full run beats w_share on val by more "
                 "than one standard error")
    return text


def markdown(doc: dict[str, Any]) -> str:
    """The results table (and the rank check, and the figures) as Markdown."""
    c, data = doc["config"], doc["data"]
    counts = data.get("counts", {})
    realised = (data.get("noise") or {}).get("realised", {})
    lines = [
        "# Noisy CIFAR-10: Swift Sampler against peers on one training budget", "",
        f"Command: `{doc['command']}`"
        + (f" (this report: `{doc['report_command']}`)" if doc.get("report_command") else ""), "",
        f"Preset `{c['preset']}`: {c['model']}, {counts.get('train', '?'):,} noisy train / "
        f"{counts.get('val', '?'):,} noisy val / {counts.get('test', '?'):,} clean test images; "
        f"noise `{c['noise'] if not c.get('labels') else 'labels: ' + c['labels'].rsplit('/', 1)[-1]}` (realised on train {_pct(realised.get('train'))}%); every method "
        f"trains {c['epochs']} epochs at batch {c['batch_size']}, lr {c['lr']:g} "
        f"(`{c['train_preset']}` recipe), equal optimiser steps; search {_search(c)}, "
        f"{c['crops_per_image']} crops per image; "
        f"cleanlab {c['cleanlab_folds']}-fold; mean ± std over the seeds each method ran.", "",
        "| method | seeds | clean-test top-1 | val top-1 (noisy) | sampler gap recovered | "
        "full gap recovered | training cost (runs) | search cost (runs) | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, e in doc["methods"].items():
        t = e["test_top1"]
        acc = _pct(t["mean"]) + (f" ± {100 * t['std']:.2f}" if t["std"] is not None else "")
        name = f"{m} (true rate given)" if m == "small-loss" else m
        lines.append(f"| {name} | {t['n']} | {acc} | {_pct(e['val_top1']['mean'])} | {_share(e['sampler_gap_recovered'])} | "
                     f"{_share(e['full_gap_recovered'])} | {_num(e['train_runs'])} | "
                     f"{_num(e.get('search_cost_runs'))} | {_duration(e['seconds']['mean'])} |")
    lines += [
        "", "Sampler gap recovered: (method − uniform) / (oracle-mask − uniform); full gap: "
        "(method − uniform) / (clean − uniform), on the means over the seeds where all three "
        "ran. Training cost: optimiser steps "
        "of the method in units of one training run (search trials included); search cost: "
        "the epochs of every search trial (noise and guard re-runs included) / epochs of one run. Wall time: the method's own work; "
        "the uniform run doubles as w_share for small-loss and ss. Val top-1 is scored against the "
        "noisy val labels, the only score any choice was made on.",
    ]
    shared = {k: v["mean"] for k, v in doc.get("shared_seconds", {}).items() if v["mean"] is not None}
    if shared:
        lines.append("Shared stages: " + ", ".join(f"{k} {_duration(v)}" for k, v in shared.items()) + ".")
    checks = [(m, r) for m, e in doc["methods"].items() for r in e.get("per_seed", [])
              if r.get("confirm")]
    if checks:
        lines += ["", "Full-run check of the ss methods (val only; the row above is what the user "
                  "gets): " + "; ".join(f"{m}, seed {r['seed']}: {r['confirm']['reason']} (the "
                                        f"sampler's run: test {_pct(r['confirm']['sampler_test_top1'])})"
                                        for m, r in checks) + "."]
    if doc.get("curves"):
        lines += _curves(doc["curves"])
    if "verify_ranks" in doc:
        v = doc["verify_ranks"]
        lines += ["", "## Inner-loop check (appendix A.1.1)", "",
                  "The last searched samplers of `ss`, retrained from scratch and scored on val.", "",
                  "| seed | samplers | SR (Spearman) | TR (from-scratch rank of the fine-tune top-1) |",
                  "|---|---|---|---|"]
        for s, r in enumerate(v["per_seed"]):
            lines.append(f"| {s} | {r['samplers']} | {_num(r['sr'], 2)} | {r['tr']} |")
    if doc.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in doc["figures"]]
    for note in doc.get("figures_missing", []):
        lines.append(f"- not drawn: {note}")
    return "\n".join(lines) + "\n"


def _curves(curves: dict[str, Any]) -> list[str]:
    """How the uniform and clean runs' clean-test top-1 moved over the epochs, per seed."""
    lines = ["", "## Per-epoch curves", "",
             "Clean-test top-1 (a diagnostic) of the uniform and clean-label runs, recorded after "
             "every epoch; `uniform-early` is the uniform run's epoch of best noisy val.", "",
             "| seed | run | best test (epoch) | last test | drop | best-val epoch: test | "
             "last train accuracy (given labels) |",
             "|---|---|---|---|---|---|---|"]
    for seed, runs in curves["memorisation"].items():
        for name, m in runs.items():
            lines.append(f"| {seed} | {name} | {_pct(m['best_test'])} ({m['best_test_epoch'] + 1}) | "
                         f"{_pct(m['last_test'])} | {100 * m['drop']:.2f} | "
                         f"{m['best_val_epoch'] + 1}: {_pct(m['test_at_best_val'])} | "
                         f"{_pct(m['last_train_accuracy'])} |")
    return lines


def _repeats(n: int) -> str:
    return f", {n} fine-tunes per trial averaged" if n > 1 else ""


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
