"""The outer loop of Algorithm 1, resumable: ask a point, evaluate its sampler, record, tell.

Invariants of ``searches/NAME/``:
- ``search.json`` holds the settings; a rerun with other settings is refused, naming them;
- ``trials.parquet`` holds every *finished* trial exactly once, rewritten atomically after
  each trial, so a crash or Ctrl-C loses at most the trial in flight, which is re-run;
- ``best_sampler.json`` is the best finished trial so far, rewritten after each trial;
- proposals are a deterministic function of (seed, recorded trials), so a resumed search
  asks exactly what an uninterrupted one would have asked.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sampler import Sampler
from pipeline.sampler_file import save_sampler
from storage import StoreError, StoreLayout, atomic_write_json, atomic_write_parquet, exclusive_lock
from storage.schemas import TRIALS

from .agents import create_agent

log = logging.getLogger(__name__)
PARAMS = ("e1", "e2", "e3", "v0", "v1", "v2", "v3", "v4", "c1", "c2")


@dataclass(frozen=True)
class TrialResult:
    """What one evaluation of a sampler returns (``score``: val top-1 in [0, 1], NaN on failure)."""

    score: float
    epochs: int
    kept_fraction: float = math.nan
    flipped_kept_share: float = math.nan  # diagnostics only: never shown to the agent


Objective = Callable[[Sampler, int], TrialResult]


def read_trials(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return pq.read_table(path).to_pylist()


def run_search(
    store: str | Path,
    name: str,
    objective: Objective,
    make_sampler: Callable[[np.ndarray], Sampler],
    *,
    settings: dict[str, Any],
    steps: int = 40,
    agent: str = "gp-ucb",
    seed: int = 0,
    initial_points: tuple[np.ndarray, ...] = (),
    provenance: dict[str, Any] | None = None,
    on_trial: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    is_main: bool = True,
    broadcast: Callable[[Any], Any] = lambda x: x,
) -> dict[str, Any]:
    """Run (or resume) the search ``name`` until ``steps`` trials are recorded.

    Args:
        objective: ``objective(sampler, trial_seed) -> TrialResult``; the expensive inner loop.
        make_sampler: maps a point of [0,1]^10 to a ``Sampler`` (tables and transform bound).
        settings: everything that defines the search; stored in ``search.json`` and compared on
            resume. ``steps`` may grow on resume; nothing else may change.
        broadcast: under torchrun, sends rank 0's proposal to every rank (identity otherwise).

    Returns:
        A summary dict (trials, best score and trial, paths).
    """
    layout = StoreLayout(store).require()
    folder = layout.search(name)
    trials_path, config_path = folder / "trials.parquet", folder / "search.json"
    settings = {**settings, "agent": agent, "seed": seed}
    with exclusive_lock(folder / ".lock", f"search {name!r}") if is_main else _nullcontext():
        if is_main:
            _check_settings(config_path, settings)
            atomic_write_json(config_path, {**settings, "steps": steps})
        trials = read_trials(trials_path)
        bot = create_agent(agent, dim=len(PARAMS), seed=seed, initial_points=initial_points)
        for t in trials:
            bot.tell(np.asarray(t["point"], dtype=float), t["score"])
        durations: list[float] = []
        for number in range(len(trials), steps):
            point = broadcast(bot.ask() if is_main else None)
            sampler = make_sampler(np.asarray(point, dtype=float))
            t0 = time.perf_counter()
            try:
                result = objective(sampler, seed + number)
            except FloatingPointError as e:
                log.warning("trial %d failed: %s", number, e)
                result = TrialResult(score=math.nan, epochs=0)
            row = _record(number, point, sampler, result, time.perf_counter() - t0, seed + number, trials)
            bot.tell(np.asarray(point, dtype=float), row["score"])
            trials.append(row)
            if is_main:
                atomic_write_parquet(trials_path, pa.Table.from_pylist(trials, schema=TRIALS))
                best = max(trials, key=lambda r: (r["status"] == "ok", r["score"]))
                if best is row:
                    save_sampler(folder / "best_sampler.json", sampler,
                                 {**(provenance or {}), "search": name, "trial": number,
                                  "score": row["score"]})
                durations.append(row["seconds"])
                if on_trial:
                    eta = float(np.median(durations)) * (steps - number - 1)
                    on_trial(row, {"best": best, "remaining": steps - number - 1, "eta_s": eta})
    return summarize(store, name)


def summarize(store: str | Path, name: str) -> dict[str, Any]:
    folder = StoreLayout(store).search(name)
    trials = read_trials(folder / "trials.parquet")
    if not trials:
        raise StoreError(f"search {name!r} has no finished trials in {folder}")
    ok = [t for t in trials if t["status"] == "ok"]
    best = max(ok, key=lambda r: r["score"]) if ok else None
    return {
        "search": name,
        "trials": len(trials),
        "failed": len(trials) - len(ok),
        "best_trial": best["trial"] if best else None,
        "best_score": best["score"] if best else None,
        "best_sampler": str(folder / "best_sampler.json"),
        "trials_path": str(folder / "trials.parquet"),
    }


def _record(number, point, sampler, result: TrialResult, seconds, trial_seed, trials) -> dict[str, Any]:
    ok = math.isfinite(result.score)
    finished = [t["score"] for t in trials if t["status"] == "ok"]
    # A diverged fine-tune is recorded with the worst score seen, so the agent learns to avoid it.
    score = float(result.score) if ok else (min(finished) if finished else 0.0)
    params = {k: float(v) for k, v in sampler.parameters().items()}
    return {
        "trial": number,
        "point": [float(x) for x in point],
        **params,
        "score": score,
        "status": "ok" if ok else "failed",
        "epochs": int(result.epochs),
        "seconds": float(seconds),
        "seed": int(trial_seed),
        "kept_fraction": float(result.kept_fraction),
        "flipped_kept_share": float(result.flipped_kept_share),
    }


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    if not path.is_file():
        return
    import json

    stored = json.loads(path.read_text())
    stored.pop("steps", None)
    diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if diff:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in diff)
        raise StoreError(
            f"search {path.parent.name!r} exists with other settings ({details}); "
            "rerun with the stored settings to resume, or pick a new --name"
        )


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["TrialResult", "read_trials", "run_search", "summarize"]
