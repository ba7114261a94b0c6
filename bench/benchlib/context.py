"""One seed of the benchmark: its two stores, one training recipe, timings, shared stages.

Every training goes through ``SeedRun.train``: the same model, epochs, batch size, learning
rate and schedule for every method (equal optimiser steps), a named run in the store
(``runs/NAME``) that resumes after a crash and is reused once finished. Components record
their wall time once, in ``seed-S/times.json``, so a resumed benchmark still reports the time
each piece took (a piece interrupted and resumed counts its last attempt only).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swift_sampler.storage import StoreLayout, read_features_meta, sha256_file
from swift_sampler.train.checkpoint import load_model
from swift_sampler.train.distributed import pick_device
from swift_sampler.train.dynamics import store_dynamics
from swift_sampler.train.evaluate import evaluate
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.trainer import SamplerHook, fit

from .config import BenchConfig
from .stores import write_json


@dataclass
class SeedRun:
    """Paths and helpers of one seed. ``log`` prints progress lines."""

    config: BenchConfig
    seed: int
    folder: Path
    noisy: Path
    clean: Path
    log: Callable[[str], None] = print
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        path = self.folder / "times.json"
        if path.is_file():
            self.times.update(json.loads(path.read_text()))

    # -- timing ----------------------------------------------------------------------------
    @contextmanager
    def timed(self, component: str):
        """Record the wall time of ``component`` the first time it completes."""
        t0 = time.perf_counter()
        yield
        if component not in self.times:
            self.times[component] = round(time.perf_counter() - t0, 2)
            write_json(self.folder / "times.json", self.times)

    def seconds(self, *components: str) -> float:
        return round(sum(self.times.get(c, 0.0) for c in components), 2)

    # -- training --------------------------------------------------------------------------
    def train(self, name: str, *, store: Path | None = None, hook: SamplerHook | None = None,
              epochs: int | None = None):
        """Train (or resume, or reuse) run ``name`` with the benchmark's recipe.

        Returns ``(model, summary)``; ``summary["seconds"]`` is this run's wall time.
        """
        c = self.config
        store = Path(store or self.noisy)
        # Per-epoch scores only where they are used (curves, early stopping); elsewhere skipping
        # them saves ~8% per run.
        curves = c.curves and name in ("uniform", "clean")
        config = resolve_config(
            str(store), preset=c.train_preset, name=name, model=c.model, epochs=epochs or c.epochs,
            batch_size=c.batch_size, lr=c.lr, seed=self.seed, workers=c.workers,
            progress=c.progress, resume=True, val_split="val" if curves else "",
            diagnostic_split="test" if curves else None)
        run = StoreLayout(store).run(name)
        with self.timed(f"run:{name}"):
            if (run / "summary.json").is_file():
                summary = json.loads((run / "summary.json").read_text())
                if summary.get("epochs") == config.epochs:
                    model, _ = load_model(run / "checkpoint.pt", pick_device())
                    return model, summary
            result = fit(config, sampler=hook)
            return result.model, result.summary

    def checkpoint(self, name: str, store: Path | None = None) -> Path:
        return StoreLayout(store or self.noisy).run(name) / "checkpoint.pt"

    def w_share(self):
        """The uniform run (trained on first use): the baseline and the search's start point."""
        return self.train("uniform")

    def ensure_features(self) -> dict[str, Any]:
        """Features and tables of the noisy store, built from ``w_share`` (once)."""
        from swift_sampler.pipeline.features.build import build_features

        layout = StoreLayout(self.noisy)
        ckpt = self.checkpoint("uniform")
        if not ckpt.is_file():
            self.w_share()
        sha = sha256_file(ckpt)
        if not layout.dynamics.is_file():  # stores built before the dynamics were stored
            store_dynamics(self.noisy, ckpt)
        if layout.features_meta.is_file() and layout.tables_meta.is_file():
            meta = read_features_meta(layout)
            if meta.get("done") and meta.get("checkpoint_sha256") == sha:
                self._ensure_tables()
                return meta
        model, _ = load_model(ckpt, pick_device())
        with self.timed("features"):
            built = build_features(self.noisy, model, crops_per_image=self.config.crops_per_image,
                                   seed=self.seed, checkpoint_sha256=sha,
                                   workers=self.config.workers, progress=self.config.progress)
        store_dynamics(self.noisy, ckpt)
        self._ensure_tables()
        return built

    def _ensure_tables(self) -> None:
        """The store's tables are built for the configured feature pair (cheap: rebuilt when
        another pair's are there, e.g. after an ss method of another ``features_pair``)."""
        from swift_sampler.pipeline.sampler.pair import FeaturePair
        from swift_sampler.pipeline.sampler.table_store import build_store_tables

        layout = StoreLayout(self.noisy)
        pair = self.config.pair()
        if FeaturePair.from_record(json.loads(layout.tables_meta.read_text())) != pair:
            build_store_tables(self.noisy, pair=pair)

    # -- scores ----------------------------------------------------------------------------
    def scores(self, model) -> dict[str, Any]:
        """Clean-test top-1 (the reported number) and val top-1 against the noisy val labels."""
        w = self.config.workers
        test = evaluate(self.noisy, model, "test", workers=w)
        val = evaluate(self.noisy, model, "val", workers=w)
        return {"test_top1": test["top1"], "val_top1": val["top1"],
                "val_clean_accuracy": (val.get("noise") or {}).get("clean_accuracy")}
