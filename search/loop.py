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

Phases (the ``phase`` column): trial 0 is the first initial point (the uniform sampler);
with ``guard.repeats = r >= 1`` it is evaluated again on the fresh seeds ``seed + 1 ..
seed + r`` ("noise" trials), which measures the inner loop's seed noise on this store; that noise bounds
the GP's noise level below. Then "search" trials until ``steps`` of them are recorded. Then,
with the guard on, the top ``guard.candidates`` points by GP posterior mean are evaluated on the
same ``r`` seeds as the uniform sampler ("guard" trials, reusing any evaluation already made on
such a seed), and ``best_sampler.json`` is the candidate that beats uniform by more than the
measured noise, or the uniform sampler (``choice.guard_decision``). With ``guard.inner_loop``
set to a start of its own (e.g. "early"), the guard compares the candidates and the uniform
sampler with that inner loop instead ("guard-early" trials, made for the guard alone): a second
opinion on the final choice that does not share the search inner loop's horizon bias. Before the
guard has run the recommendation is the point of highest posterior mean. A full-run check of
the recommended trial (``search.confirm``, ``confirm.json``) that did not beat ``w_share``
makes it the uniform sampler too. Only "search" trials are told to the agent. Every step
is a function of the recorded trials, so a resumed search asks exactly what an uninterrupted
one would. The guard's ``enabled``, ``candidates`` and ``inner_loop`` may change when a search
is resumed (they act only after the last search trial, so the recorded trials are what an
uninterrupted search with the new settings records): a finished search can be guarded again at
the cost of the guard alone.

A failed trial (non-finite score, e.g. a diverged fine-tune) is recorded with ``status =
"failed"`` and the worst score among the finished trials before it (0.0 when there is none),
which is also what the agent is told, so it learns to avoid that region; the search goes on.

Under torchrun, rank 0 alone reads and writes the folder and runs the agent; every proposal
(and the trial to start from) is broadcast, and every rank runs the objective (DDP).
"""

from __future__ import annotations

import contextlib
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

from swift_sampler.pipeline.sampler.file import save_sampler
from swift_sampler.pipeline.sampler.function import PARAMETERS, Sampler
from swift_sampler.pipeline.sampler.pair import DEFAULT_PAIR
from swift_sampler.storage import (
    StoreError,
    StoreLayout,
    atomic_write_json,
    atomic_write_parquet,
    exclusive_lock,
    literal,
    read_json_object,
    read_view,
    remove_stale_temporaries,
)
from swift_sampler.storage.errors import UsageError
from swift_sampler.storage.schemas import TRIALS

from .agents import create_agent
from .choice import guard_decision, measured_noise, rank_candidates
from .settings import GUARD_INNER_LOOPS, GuardSettings

log = logging.getLogger(__name__)
TRIAL_SEEDS = ("common", "distinct")
TRIALS_FILE, SETTINGS_FILE, BEST_FILE = "trials.parquet", "search.json", "best_sampler.json"
# The full-run check of the recommended trial (``search.confirm``), when one was run.
CONFIRM_FILE = "confirm.json"
# The phases of trials run by the search's inner loop; a guard with an inner loop of its own
# records "guard-START" trials (START: its start, e.g. "guard-early").
PHASES = ("search", "noise", "guard")
# The inner loops a guard may compare with: the search's own, or one of the objective's starts.
# Guard settings that act only after the last search trial, so a resumed search may change them.
GUARD_MAY_CHANGE = ("enabled", "candidates", "inner_loop")
# Settings that search.json records only since searches started recording them: one without
# them was made with values no one knows, so they are not checked (and are recorded from then).
RECORDED_LATER = ("workers", "world_size")


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
    """Rows of ``STORE/searches/NAME/trials.parquet`` (empty when it does not exist), in trial
    order, read through STORE's catalog (the store and the search name come from the path).

    Files written before the ``phase`` column existed read as all "search" trials.
    """
    path = Path(path)
    if not path.is_file():
        return []
    # Through the catalog's ``trials`` view, which unions every search of the store by column
    # name: this search's rows, with this file's own columns.
    columns = _trials_columns(path)
    rows = read_view(path.parents[2], "trials", columns,
                     where=f"search = {literal(path.parent.name)}", order_by="trial").to_pylist()
    if [r["trial"] for r in rows] != list(range(len(rows))):
        raise StoreError(f"{path} does not hold trials 0..{len(rows) - 1} in order; it was edited "
                         "by hand? Move it away and start a new search")
    for r in rows:
        r["phase"] = r.get("phase") or "search"
    return rows


def _trials_columns(path: Path) -> list[str]:
    """The columns of a trials file; ``StoreError`` naming it when it is not readable Parquet."""
    try:
        return pq.read_schema(path).names
    except pa.ArrowException as e:  # ArrowInvalid: empty, cut short, not Parquet
        raise StoreError(f"{path} is not a readable trials file ({e}); it is rewritten whole "
                         "after each trial, so it was damaged afterwards: restore it from a "
                         f"backup, or move {path.parent} away and start the search anew") from None


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
    guard: GuardSettings | None = None,
    guard_objective: Objective | None = None,
    provenance: dict[str, Any] | None = None,
    on_trial: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    is_main: bool = True,
    broadcast: Callable[[Any], Any] = lambda x: x,
) -> dict[str, Any]:
    """Run (or resume) the search ``name`` until ``steps`` search trials (and the guard) are recorded.

    Args:
        store: store directory (ingested).
        name: search name; the folder is ``STORE/searches/NAME``.
        objective: ``objective(sampler, trial_seed) -> TrialResult``; the expensive inner loop.
            It must write nothing that a re-run of the same trial would not overwrite.
        make_sampler: maps a point of [0,1]^10 to a ``Sampler`` (tables and transform bound).
        settings: everything else that defines the search (JSON-able); stored in ``search.json``
            with ``agent``, ``seed``, ``trial_seeds`` and ``guard`` and compared on resume.
        steps: E_o, the number of search trials to reach; may grow on resume.
        agent, seed, initial_points: passed to ``create_agent``. ``initial_points[0]`` is the
            baseline (the uniform sampler) that the noise trials and the guard evaluate.
        trial_seeds: "distinct": trial ``n``'s objective gets ``seed + n`` (independent noise,
            which the GP's noise term models); "common": every search trial gets ``seed``
            (common random numbers: same data order, augmentation and filter keys).
        guard: ``GuardSettings`` (default: on, 2 candidates, 3 seeds, by the early inner loop
            given as ``guard_objective``, or without one by the search's); needs initial points.
        guard_objective: the inner loop of the guard's trials when ``guard.inner_loop`` is not
            "search" (required then).
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
        raise UsageError(f"steps must be >= 1, got {steps}")
    if trial_seeds not in TRIAL_SEEDS:
        raise UsageError(f"trial_seeds must be one of {', '.join(TRIAL_SEEDS)}, got {trial_seeds!r}")
    if guard is None:  # the early loop is an objective of its own, which only the caller builds
        guard = GuardSettings() if guard_objective is not None else GuardSettings(inner_loop="search")
    guard = guard.check()
    baseline = np.asarray(initial_points[0], dtype=np.float64) if initial_points else None
    if baseline is None:  # nothing to measure the noise on or to compare with
        guard = GuardSettings(enabled=False, repeats=0)
    if guard.enabled and guard.inner_loop != "search" and guard_objective is None:
        raise UsageError(f"a guard with the {guard.inner_loop!r} inner loop needs its objective "
                         "(guard_objective)")
    layout = StoreLayout(store).require()
    folder = layout.search(name)
    settings = _jsonable({**settings, "agent": agent, "seed": int(seed), "trial_seeds": trial_seeds,
                          "guard": guard.to_json(),
                          "baseline": None if baseline is None else baseline.tolist()})
    with exclusive_lock(folder / ".lock", f"search {name!r}") if is_main else contextlib.nullcontext():
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
                    if t["phase"] == "search":
                        bot.tell(np.asarray(t["point"], dtype=float), t["score"])
                if trials:
                    write_best(folder, trials, make_sampler, name, provenance, settings, steps)
            except Exception as e:  # every rank must learn of it, or the others would hang
                error = e
        start = broadcast(("error", str(error)) if error else ("start", len(trials)))
        if error is not None:
            raise error
        if start[0] == "error":
            raise StoreError(f"rank 0 failed: {start[1]}")
        durations: list[float] = []
        while True:
            task = broadcast(_next_task(trials, bot, settings, steps) if is_main else None)
            if task is None:
                break
            phase, point, trial_seed = task[0], np.asarray(task[1], dtype=np.float64), int(task[2])
            sampler = make_sampler(point)
            t0 = time.perf_counter()
            result = (objective if phase in ("search", "noise") else guard_objective or objective)(
                sampler, trial_seed)
            seconds = time.perf_counter() - t0
            if not is_main:
                continue
            row = _record(len(trials), point, sampler, result, seconds, trial_seed, trials, phase)
            if row["status"] == "failed":
                log.warning("trial %d failed (%s); recorded with the worst score %.4f",
                            row["trial"], result.error or "non-finite score", row["score"])
            if phase == "search":
                bot.tell(point, row["score"])
            trials.append(row)
            atomic_write_parquet(folder / TRIALS_FILE, pa.Table.from_pylist(trials, schema=TRIALS))
            best = write_best(folder, trials, make_sampler, name, provenance, settings, steps)
            durations.append(seconds)
            if on_trial:
                remaining = _remaining(trials, settings, steps)
                on_trial(row, {"best": best, "remaining": remaining,
                               "eta_s": float(np.median(durations)) * remaining,
                               "extra": result.extra})
    # Other ranks may not see rank 0's files (several machines): they get the name alone.
    return summarize(store, name) if is_main else {"search": name}


# -- the schedule: every step a function of the recorded trials ------------------------------
def _seed_of(settings: dict[str, Any], number: int) -> int:
    return int(settings["seed"]) + (number if settings["trial_seeds"] == "distinct" else 0)


def guard_seeds(settings: dict[str, Any]) -> list[int]:
    """Fresh seeds on which the baseline and the guard's candidates are compared.

    ``seed + 1 .. seed + repeats``: never trial 0's seed, and under common trial seeds never
    the seed on which a candidate was found (its luck there would carry into the test).
    """
    return [int(settings["seed"]) + 1 + j for j in range(int(settings["guard"]["repeats"]))]


def _same(a, b) -> bool:
    return b is not None and np.allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-12)


def _evaluation(trials, point, seed: int, phases: tuple[str, ...] = PHASES) -> dict[str, Any] | None:
    """The recorded trial of ``point`` on ``seed`` in one of ``phases`` (default: those of the
    search's inner loop), if any."""
    return next((t for t in trials if t["seed"] == seed and _same(t["point"], point)
                 and t["phase"] in phases), None)


def guard_phase(settings: dict[str, Any]) -> str:
    """The phase of the guard's trials: "guard" with the search's inner loop, "guard-START"
    with an inner loop of its own."""
    inner = settings["guard"].get("inner_loop", "search")
    return "guard" if inner == "search" else f"guard-{inner}"


def _guard_lookup(settings: dict[str, Any]) -> tuple[str, ...]:
    """The phases the guard's evaluations are looked up in: with the search's inner loop every
    phase of it (so the uniform sampler's noise trials count), else the guard's own phase."""
    phase = guard_phase(settings)
    return PHASES if phase == "guard" else (phase,)


def _guard_compared(trials, settings: dict[str, Any]) -> list[list[float]]:
    """Every point the guard evaluates on its seeds: the uniform sampler first when the guard
    has its own inner loop (the search's noise trials were made with another)."""
    points = [c["point"] for c in _guard_candidates(trials, settings)]
    return points if _guard_lookup(settings) == PHASES else [list(settings["baseline"]), *points]


def search_noise(trials, settings: dict[str, Any]) -> float | None:
    """Measured seed noise of the inner loop: sd of the baseline's scores (trial 0 and the
    noise trials)."""
    base = settings.get("baseline")
    if base is None:
        return None
    seeds = [_seed_of(settings, 0), *guard_seeds(settings)]
    rows = [_evaluation(trials, base, g) for g in seeds]
    return measured_noise([r["score"] for r in rows if r is not None and r["status"] == "ok"])


def _guard_candidates(trials, settings: dict[str, Any]) -> list[dict[str, Any]]:
    ranked = rank_candidates(trials, exclude=np.asarray(settings["baseline"]),
                             noise_sd=search_noise(trials, settings), seed=int(settings["seed"]))
    return ranked[: int(settings["guard"]["candidates"])]


def _next_task(trials, bot, settings: dict[str, Any], steps: int):
    """``(phase, point, seed)`` of the next trial, or None when the search is complete."""
    n_search = sum(t["phase"] == "search" for t in trials)
    base = settings.get("baseline")
    if n_search == 0:
        return ("search", bot.ask().tolist(), _seed_of(settings, len(trials)))
    if base is not None:
        for g in guard_seeds(settings):
            if _evaluation(trials, base, g) is None:
                return ("noise", list(base), g)
    if n_search < steps:
        if hasattr(bot, "set_noise"):
            bot.set_noise(search_noise(trials, settings))
        return ("search", bot.ask().tolist(), _seed_of(settings, len(trials)))
    if settings["guard"]["enabled"]:
        lookup = _guard_lookup(settings)
        for point in _guard_compared(trials, settings):
            for g in guard_seeds(settings):
                if _evaluation(trials, point, g, lookup) is None:
                    return (guard_phase(settings), point, g)
    return None


def _remaining(trials, settings: dict[str, Any], steps: int) -> int:
    n_search = sum(t["phase"] == "search" for t in trials)
    r = int(settings["guard"]["repeats"]) if settings.get("baseline") is not None else 0
    noise_left = sum(_evaluation(trials, settings["baseline"], g) is None
                     for g in guard_seeds(settings)) if r else 0
    own = settings["guard"].get("inner_loop", "search") != "search"
    guard_left = (int(settings["guard"]["candidates"]) + own) * r if settings["guard"]["enabled"] else 0
    if n_search >= steps and settings["guard"]["enabled"]:
        lookup = _guard_lookup(settings)
        guard_left = sum(_evaluation(trials, p, g, lookup) is None
                         for p in _guard_compared(trials, settings) for g in guard_seeds(settings))
    return max(steps - n_search, 0) + noise_left + guard_left


# -- the recommendation --------------------------------------------------------------------
def recommend(trials: list[dict[str, Any]], settings: dict[str, Any], steps: int,
              confirm: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What ``best_sampler.json`` holds: ``{"trial", "point", "score", "choice", ...}``.

    ``choice``: "guard" (a candidate that beat uniform on common seeds), "uniform" (the guard
    found none, or the full-run check ``confirm`` of this very trial did not beat ``w_share``),
    "posterior-mean" (the guard is off or has not run yet) or "raw" (fewer than three finished
    trials: no GP yet). A ``confirm`` of another trial (the search has moved on) is ignored.
    """
    rec = _recommend(trials, settings, steps)
    if rec is None or confirm is None or rec["choice"] == "uniform" or confirm.get("trial") != rec["trial"]:
        return rec
    rec = {**rec, "confirm": confirm}
    if confirm.get("kept"):
        return rec
    first = _evaluation(trials, settings["baseline"], _seed_of(settings, 0))
    return {**rec, "trial": int(first["trial"]), "point": list(settings["baseline"]),
            "score": float(first["score"]), "choice": "uniform"}


def _recommend(trials: list[dict[str, Any]], settings: dict[str, Any], steps: int) -> dict[str, Any] | None:
    raw = best_trial(trials)
    if raw is None:
        return None
    noise = search_noise(trials, settings)
    guard = settings.get("guard") or {"enabled": False}
    base = settings.get("baseline")
    out = {"raw_best_trial": int(raw["trial"]), "raw_best_score": float(raw["score"]),
           "noise_sd": noise}
    ranked = rank_candidates(trials, noise_sd=noise, seed=int(settings.get("seed", 0)))
    top = ranked[0] if ranked else None
    if top is not None:
        out.update(posterior_best_trial=top["trial"], posterior_mean=top["posterior_mean"])
    n_search = sum(t["phase"] == "search" and t["status"] == "ok" for t in trials)
    done = sum(t["phase"] == "search" for t in trials) >= steps
    if guard.get("enabled") and base is not None and done:
        seeds = guard_seeds(settings)
        cands, lookup = _guard_candidates(trials, settings), _guard_lookup(settings)
        evals = {c["trial"]: [_evaluation(trials, c["point"], g, lookup) for g in seeds] for c in cands}
        uni = [_evaluation(trials, base, g, lookup) for g in seeds]
        if all(e is not None for e in uni) and all(e is not None for es in evals.values() for e in es):
            def score(e):
                return e["score"] if e["status"] == "ok" else None

            first = _evaluation(trials, base, _seed_of(settings, 0))
            # Trial 0 joins the noise estimate only when it ran the guard's inner loop.
            extra = [score(first)] if first and lookup == PHASES else []
            decision = guard_decision(
                [{"trial": t, "scores": [score(e) for e in es]} for t, es in evals.items()],
                [score(e) for e in uni], uniform_extra=extra)
            out["guard"] = {**decision, "seeds": seeds, "phase": guard_phase(settings),
                            "uniform_scores": [score(e) for e in uni],
                            "candidates": [{"trial": t, "scores": [score(e) for e in es]}
                                           for t, es in evals.items()]}
            winner = decision["winner"]
            if winner is None:
                return {**out, "trial": int(first["trial"]), "point": list(base),
                        "score": float(first["score"]), "choice": "uniform"}
            row = trials[winner]
            return {**out, "trial": winner, "point": row["point"], "score": float(row["score"]),
                    "choice": "guard"}
    if top is None or n_search < 3:
        return {**out, "trial": int(raw["trial"]), "point": raw["point"], "score": float(raw["score"]),
                "choice": "raw"}
    return {**out, "trial": top["trial"], "point": top["point"], "score": top["score"],
            "choice": "posterior-mean"}


def summarize(store: str | Path, name: str) -> dict[str, Any]:
    """Counts, the recommended trial, the raw best, the guard and the paths of search ``name``."""
    folder = StoreLayout(store).search(name)
    trials = read_trials(folder / TRIALS_FILE)
    if not trials:
        raise StoreError(f"search {name!r} has no finished trials in {folder}; run "
                         "`swift-sampler search run` first")
    settings = _settings_with_defaults(read_settings(store, name) or {})
    steps = int(settings.get("steps") or sum(t["phase"] == "search" for t in trials))
    rec = recommend(trials, settings, steps, read_confirm(folder))
    return {
        "search": name,
        "trials": len(trials),
        "search_trials": sum(t["phase"] == "search" for t in trials),
        "failed": sum(t["status"] != "ok" for t in trials),
        "best_trial": rec["trial"] if rec else None,
        "best_score": rec["score"] if rec else None,
        "choice": rec["choice"] if rec else None,
        "raw_best_trial": rec["raw_best_trial"] if rec else None,
        "raw_best_score": rec["raw_best_score"] if rec else None,
        "posterior_best_trial": rec.get("posterior_best_trial") if rec else None,
        "noise_sd": rec["noise_sd"] if rec else None,
        "guard": rec.get("guard") if rec else None,
        "confirm": rec.get("confirm") if rec else None,
        "best_sampler": str(folder / BEST_FILE) if rec else None,
        "trials_path": str(folder / TRIALS_FILE),
    }


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished ("ok") search trial with the highest raw score; the earliest among equals."""
    ok = [t for t in trials if t["status"] == "ok" and t.get("phase", "search") == "search"]
    return max(ok, key=lambda r: (r["score"], -r["trial"])) if ok else None


def best_so_far(trials: list[dict[str, Any]]) -> np.ndarray:
    """Best raw score of the "ok" search trials up to each trial, float64 ``(n,)`` (NaN before
    the first)."""
    out, best = [], -math.inf
    for t in trials:
        if t["status"] == "ok" and t.get("phase", "search") == "search":
            best = max(best, t["score"])
        out.append(best if best > -math.inf else math.nan)
    return np.asarray(out, dtype=np.float64)


def read_settings(store: str | Path, name: str) -> dict[str, Any] | None:
    """``search.json`` of search ``name`` (None when there is none); ``StoreError`` naming it
    when it is not a JSON object."""
    path = StoreLayout(store).search(name) / SETTINGS_FILE
    return _read_settings_file(path) if path.is_file() else None


def _read_settings_file(path: Path) -> dict[str, Any]:
    # Without the settings its trials were made with, a search cannot be resumed safely.
    return _with_pair(read_json_object(path, "restore it from a backup, or move "
                                       f"{path.parent} away and start the search anew"))


def _with_pair(settings: dict[str, Any]) -> dict[str, Any]:
    # Settings without a feature pair (a search made before samplers took any) mean the paper's.
    return {"feature_pair": DEFAULT_PAIR.record(), **settings}


def _settings_with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    # search.json of a search made before the guard existed: no guard, no baseline.
    return {"seed": 0, "trial_seeds": "distinct", "guard": {"enabled": False, "candidates": 1, "repeats": 0},
            "baseline": None, **settings}


def read_confirm(folder: Path) -> dict[str, Any] | None:
    """The recorded full-run check of search folder ``folder`` (None if none was run)."""
    path = Path(folder) / CONFIRM_FILE
    if not path.is_file():
        return None
    return read_json_object(path, "delete it and run `swift-sampler search run` again: the "
                            "full-run check resumes its training run and records its verdict anew")


def write_best(folder: Path, trials, make_sampler, name: str, provenance, settings, steps,
               confirm: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Rewrite ``best_sampler.json`` from the recorded trials and the full-run check (``confirm``,
    default the recorded one); returns the recommended trial's row."""
    rec = recommend(trials, settings, steps, confirm if confirm is not None else read_confirm(folder))
    if rec is not None:
        sampler = make_sampler(np.asarray(rec["point"], dtype=np.float64))
        save_sampler(folder / BEST_FILE, sampler,
                     {**(provenance or {}), "search": name, "trial": int(rec["trial"]),
                      "score": float(rec["score"])})
    return trials[rec["trial"]] if rec else None


def _record(number: int, point: np.ndarray, sampler: Sampler, result: TrialResult, seconds: float,
            trial_seed: int, trials: list[dict[str, Any]], phase: str = "search") -> dict[str, Any]:
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
        "phase": phase,
    }


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    # What search.json will read back (tuples become lists ...), so comparisons are exact.
    return json.loads(json.dumps(settings, allow_nan=False))


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    if not path.is_file():
        return
    stored = _read_settings_file(path)
    stored.pop("steps", None)
    settings = _with_pair(settings)
    keys = (set(stored) | set(settings)) - {k for k in RECORDED_LATER if k not in stored}
    diff = sorted(k for k in keys if _fixed(k, stored) != _fixed(k, settings))
    if diff:
        details = "; ".join(_differences(k, _fixed(k, stored), _fixed(k, settings)) for k in diff)
        raise StoreError(
            f"search {path.parent.name!r} exists with other settings ({details}); rerun with the "
            "stored settings to resume it, or pick a new --name"
        )


def _differences(key: str, stored, now) -> str:
    """``key: stored X, now Y``; for two dicts only the entries that differ (``finetune.features``)."""
    if isinstance(stored, dict) and isinstance(now, dict):
        return "; ".join(_differences(f"{key}.{k}", stored.get(k), now.get(k))
                         for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k))
    return f"{key}: stored {stored!r}, now {now!r}"


def _fixed(key: str, settings: dict[str, Any]):
    """What of setting ``key`` must match on resume: all of it, but the guard's (and its inner
    loop's recipe, ``guard_finetune``) changeable part (``GUARD_MAY_CHANGE``)."""
    value = settings.get(key)
    if key == "guard" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in GUARD_MAY_CHANGE}
    return None if key == "guard_finetune" else value


__all__ = ["GUARD_INNER_LOOPS", "PHASES", "GuardSettings", "Objective", "TrialResult", "best_so_far", "best_trial",
           "guard_phase", "guard_seeds", "read_settings", "read_trials", "recommend", "run_search", "search_noise",
           "summarize"]
