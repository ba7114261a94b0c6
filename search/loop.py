"""The outer loop of Algorithm 1, resumable: ask a point, evaluate its sampler, record, tell.

Invariants of ``searches/NAME/`` (one writer at a time, held by ``searches/NAME/.lock``):

- ``search.json`` holds the settings; a rerun with other settings is refused, naming every
  setting that differs (``steps`` alone may change: a search can be extended);
- ``trials.parquet`` holds every *finished* trial exactly once, in trial order, rewritten
  atomically after each trial, so a crash or Ctrl-C loses at most the trial in flight, which
  the next run re-runs from the start (an objective writes nothing of its own);
- ``best_sampler.json`` is the best finished trial so far, rewritten after each trial and at
  the start of a resumed run (so a crash between the two writes heals itself);
- proposals are a deterministic function of (agent, seed, recorded trials): the recorded
  points and scores are told to a fresh agent, which then asks exactly what an uninterrupted
  search would have asked next; trial ``n`` is evaluated with seed ``seed + n`` (``trial_seeds=
  "distinct"``) or ``seed`` (``"common"``), so a re-run trial repeats exactly.

A failed trial (non-finite score, e.g. a diverged fine-tune) is recorded with ``status =
"failed"`` and the worst score among the finished trials before it (0.0 when there is none),
which is also what the agent is told, so it learns to avoid that region; the search goes on.

Under torchrun, rank 0 alone reads and writes the folder and runs the agent; every proposal
(and the trial to start from) is broadcast, and every rank runs the objective (DDP).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from swift_sampler.pipeline.sampler import PARAMETERS, Sampler
from swift_sampler.pipeline.sampler_file import save_sampler
from swift_sampler.storage import (
    StoreError,
    StoreLayout,
    atomic_write_json,
    atomic_write_parquet,
    exclusive_lock,
    remove_stale_temporaries,
)
from swift_sampler.storage.schemas import TRIALS

from .agents import create_agent

log = logging.getLogger(__name__)
TRIAL_SEEDS = ("common", "distinct")
TRIALS_FILE, SETTINGS_FILE, BEST_FILE = "trials.parquet", "search.json", "best_sampler.json"


@dataclass(frozen=True)
class TrialResult:
    """What one evaluation of a sampler returns.

    Attributes:
        score: val top-1 in [0, 1] (higher is better); NaN when the evaluation failed.
        epochs: fine-tune epochs actually run.
        kept_fraction: kept / candidate crops of the filter stage (NaN without a filter).
        flipped_kept_share: diagnostics only, never shown to the agent: share of kept samples
            whose label was flipped (NaN without noise ground truth).
        error: why the evaluation failed ("" when it did not).
        extra: further diagnostics (not recorded in ``trials.parquet``).
    """

    score: float
    epochs: int
    kept_fraction: float = math.nan
    flipped_kept_share: float = math.nan
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


Objective = Callable[[Sampler, int], TrialResult]


def read_trials(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``trials.parquet`` (empty when it does not exist), in trial order."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = pq.read_table(path).to_pylist()
    if [r["trial"] for r in rows] != list(range(len(rows))):
        raise StoreError(f"{path} does not hold trials 0..{len(rows) - 1} in order; it was edited "
                         "by hand? Move it away and start a new search")
    return rows


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
    trial_seeds: str = "distinct",
    provenance: dict[str, Any] | None = None,
    on_trial: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    is_main: bool = True,
    broadcast: Callable[[Any], Any] = lambda x: x,
) -> dict[str, Any]:
    """Run (or resume) the search ``name`` until ``steps`` trials are recorded.

    Args:
        store: store directory (ingested).
        name: search name; the folder is ``STORE/searches/NAME``.
        objective: ``objective(sampler, trial_seed) -> TrialResult``; the expensive inner loop.
            It must write nothing that a re-run of the same trial would not overwrite.
        make_sampler: maps a point of [0,1]^10 to a ``Sampler`` (tables and transform bound).
        settings: everything else that defines the search (JSON-able); stored in ``search.json``
            with ``agent`` and ``seed`` and compared on resume.
        steps: E_o, the number of trials to reach; may grow on resume.
        agent, seed, initial_points: passed to ``create_agent``.
        trial_seeds: "distinct": trial ``n``'s objective gets ``seed + n`` (independent noise,
            which the GP's noise term models); "common": every trial gets ``seed`` (common
            random numbers; on digits it did not cut the noise of score differences at the
            default fine-tune lr, see ``bench/bench_trial.py``).
        provenance: merged into ``best_sampler.json``'s provenance (store_id, checkpoint sha).
        on_trial: called on rank 0 after each finished trial as ``on_trial(row, progress)``;
            ``progress`` has ``best`` (row), ``remaining`` and ``eta_s``.
        is_main, broadcast: rank 0 or not, and a function sending rank 0's object to every
            rank (identity when alone). Every rank must call ``run_search`` with the same
            arguments.

    Returns:
        ``summarize(store, name)`` on rank 0; ``{"search": name}`` on the other ranks.

    Raises:
        StoreError: settings differ from ``search.json`` (naming them), damaged trials file.
        LockedError: another process runs this search.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if trial_seeds not in TRIAL_SEEDS:
        raise ValueError(f"trial_seeds must be one of {', '.join(TRIAL_SEEDS)}, got {trial_seeds!r}")
    layout = StoreLayout(store).require()
    folder = layout.search(name)
    settings = _jsonable({**settings, "agent": agent, "seed": int(seed), "trial_seeds": trial_seeds})
    with exclusive_lock(folder / ".lock", f"search {name!r}") if is_main else _Null():
        trials: list[dict[str, Any]] = []
        bot = None
        error = None
        if is_main:
            try:
                remove_stale_temporaries(folder, recursive=False)
                _check_settings(folder / SETTINGS_FILE, settings)
                atomic_write_json(folder / SETTINGS_FILE, {**settings, "steps": int(steps)})
                trials = read_trials(folder / TRIALS_FILE)
                bot = create_agent(agent, dim=len(PARAMETERS), seed=seed, initial_points=initial_points)
                for t in trials:
                    bot.tell(np.asarray(t["point"], dtype=float), t["score"])
                if trials:
                    _write_best(folder, trials, make_sampler, name, provenance)
            except Exception as e:  # every rank must learn of it, or the others would hang
                error = e
        start = broadcast(("error", str(error)) if error else ("start", len(trials)))
        if error is not None:
            raise error
        if start[0] == "error":
            raise StoreError(f"rank 0 failed: {start[1]}")
        durations: list[float] = []
        for number in range(start[1], steps):
            point = np.asarray(broadcast(bot.ask() if is_main else None), dtype=np.float64)
            sampler = make_sampler(point)
            trial_seed = int(seed) + (number if trial_seeds == "distinct" else 0)
            t0 = time.perf_counter()
            result = objective(sampler, trial_seed)
            seconds = time.perf_counter() - t0
            if not is_main:
                continue
            row = _record(number, point, sampler, result, seconds, trial_seed, trials)
            if row["status"] == "failed":
                log.warning("trial %d failed (%s); recorded with the worst score %.4f",
                            number, result.error or "non-finite score", row["score"])
            bot.tell(point, row["score"])
            trials.append(row)
            atomic_write_parquet(folder / TRIALS_FILE, pa.Table.from_pylist(trials, schema=TRIALS))
            best = _write_best(folder, trials, make_sampler, name, provenance)
            durations.append(seconds)
            if on_trial:
                remaining = steps - number - 1
                on_trial(row, {"best": best, "remaining": remaining,
                               "eta_s": float(np.median(durations)) * remaining,
                               "extra": result.extra})
    # Other ranks may not see rank 0's files (several machines): they get the name alone.
    return summarize(store, name) if is_main else {"search": name}


def summarize(store: str | Path, name: str) -> dict[str, Any]:
    """Counts, the best finished trial and the paths of the search ``name``."""
    folder = StoreLayout(store).search(name)
    trials = read_trials(folder / TRIALS_FILE)
    if not trials:
        raise StoreError(f"search {name!r} has no finished trials in {folder}; run "
                         "`swift-sampler search run` first")
    best = best_trial(trials)
    return {
        "search": name,
        "trials": len(trials),
        "failed": sum(t["status"] != "ok" for t in trials),
        "best_trial": best["trial"] if best else None,
        "best_score": best["score"] if best else None,
        "best_sampler": str(folder / BEST_FILE) if best else None,
        "trials_path": str(folder / TRIALS_FILE),
    }


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished ("ok") trial with the highest score; the earliest among equals."""
    ok = [t for t in trials if t["status"] == "ok"]
    return max(ok, key=lambda r: (r["score"], -r["trial"])) if ok else None


def best_so_far(trials: list[dict[str, Any]]) -> np.ndarray:
    """Best score of the "ok" trials up to each trial, float64 ``(n,)`` (NaN before the first)."""
    out, best = [], -math.inf
    for t in trials:
        if t["status"] == "ok":
            best = max(best, t["score"])
        out.append(best if best > -math.inf else math.nan)
    return np.asarray(out, dtype=np.float64)


def read_settings(store: str | Path, name: str) -> dict[str, Any] | None:
    path = StoreLayout(store).search(name) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_best(folder: Path, trials, make_sampler, name: str, provenance) -> dict[str, Any] | None:
    best = best_trial(trials)
    if best is not None:
        sampler = make_sampler(np.asarray(best["point"], dtype=np.float64))
        save_sampler(folder / BEST_FILE, sampler,
                     {**(provenance or {}), "search": name, "trial": int(best["trial"]),
                      "score": float(best["score"])})
    return best


def _record(number: int, point: np.ndarray, sampler: Sampler, result: TrialResult, seconds: float,
            trial_seed: int, trials: list[dict[str, Any]]) -> dict[str, Any]:
    ok = math.isfinite(result.score)
    finished = [t["score"] for t in trials if t["status"] == "ok"]
    score = float(result.score) if ok else (min(finished) if finished else 0.0)
    return {
        "trial": number,
        "point": [float(x) for x in point],
        **{k: float(v) for k, v in sampler.parameters().items()},
        "score": score,
        "status": "ok" if ok else "failed",
        "epochs": int(result.epochs),
        "seconds": float(seconds),
        "seed": int(trial_seed),
        "kept_fraction": float(result.kept_fraction),
        "flipped_kept_share": float(result.flipped_kept_share),
    }


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    # What search.json will read back (tuples become lists ...), so comparisons are exact.
    return json.loads(json.dumps(settings, allow_nan=False))


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    stored.pop("steps", None)
    diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if diff:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in diff)
        raise StoreError(
            f"search {path.parent.name!r} exists with other settings ({details}); rerun with the "
            "stored settings to resume it, or pick a new --name"
        )


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["Objective", "TrialResult", "best_so_far", "best_trial", "read_settings", "read_trials",
           "run_search", "summarize"]
