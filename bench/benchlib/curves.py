"""Per-epoch curves of the uniform and clean-label runs: when uniform training fits the noise.

Read from the runs' ``metrics.jsonl`` (``val_accuracy``: noisy val, the only score anything is
chosen on; ``test_accuracy``: the clean test split, a diagnostic). ``memorisation`` sums a
uniform run up: its best and last clean-test epochs and the drop between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swift_sampler.storage import StoreLayout

from .context import SeedRun

RUNS = {"uniform": "noisy", "clean": "clean"}  # curve -> store holding its run


def read_curve(store: Path, run: str) -> list[dict[str, Any]] | None:
    """Epoch rows (epoch, train loss/accuracy, lr, val, test) of a run, or None without them."""
    path = StoreLayout(store).run(run) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not rows or "test_accuracy" not in rows[0]:
        return None
    keys = ("epoch", "lr", "loss", "accuracy", "val_accuracy", "test_accuracy")
    return [{k: r.get(k) for k in keys} for r in rows]


def seed_curves(run: SeedRun) -> dict[str, list[dict[str, Any]]]:
    stores = {"noisy": run.noisy, "clean": run.clean}
    out = {}
    for name, kind in RUNS.items():
        curve = read_curve(stores[kind], name)
        if curve is not None:
            out[name] = curve
    return out


def memorisation(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Best and last clean-test top-1 of a run, the epoch of each and of the best val."""
    test = [r["test_accuracy"] for r in curve]
    val = [r["val_accuracy"] for r in curve]
    best = max(range(len(test)), key=lambda i: (test[i], -i))
    best_val = max(range(len(val)), key=lambda i: (val[i], -i))
    return {"epochs": len(curve), "last_test": test[-1], "best_test": test[best],
            "best_test_epoch": curve[best]["epoch"], "drop": test[best] - test[-1],
            "best_val_epoch": curve[best_val]["epoch"], "test_at_best_val": test[best_val],
            "last_train_accuracy": curve[-1]["accuracy"]}


def plot_curves(curves: dict[int, dict[str, list[dict[str, Any]]]], out: Path) -> Path | None:
    """Clean-test and noisy-val top-1 per epoch, uniform and clean, every seed, one PNG."""
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"uniform": "tab:red", "clean": "tab:blue"}
    for seed, by_run in sorted(curves.items()):
        for name, curve in by_run.items():
            epochs = [r["epoch"] + 1 for r in curve]
            label = f"{name}, clean test" if seed == min(curves) else None
            ax.plot(epochs, [100 * r["test_accuracy"] for r in curve], color=colours[name],
                    alpha=0.9, label=label)
            if name == "uniform":
                ax.plot(epochs, [100 * r["val_accuracy"] for r in curve], color=colours[name],
                        ls="--", alpha=0.6, label="uniform, noisy val" if label else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
