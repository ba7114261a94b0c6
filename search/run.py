"""One call for a whole search: objective, tables, agent and loop, as ``search run`` does it.

    summary = search(store, "STORE/runs/w_share/checkpoint.pt", name="ss", steps=40)

The CLI, the demo and the benchmark all go through here, so a search started by one can be
resumed by another (same settings, same ``search.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.pair import check_online
from swift_sampler.pipeline.sampler.table_store import load_tables
from swift_sampler.storage import StoreError
from swift_sampler.storage.arguments import as_settings, check_call
from swift_sampler.train.distributed import init_distributed

from .agents import create_agent
from .confirm import full_run_check, full_run_recipe
from .design import DESIGN_VERSION, initial_design
from .loop import GuardSettings, read_trials, run_search, summarize
from .objective import InnerLoopObjective, InnerLoopSettings


def search(
    store: str | Path,
    checkpoint: str | Path,
    *,
    name: str,
    steps: int = 40,
    agent: str = "gp-ucb",
    transform: str = "cgf",
    seed: int = 0,
    finetune: InnerLoopSettings | None = None,
    trial_seeds: str = "common",
    guard: GuardSettings | None = None,
    workers: int = 2,
    device: str | None = None,
    confirm: bool = False,
    progress: bool = False,
    announce: Callable[[str], None] | None = None,
    on_trial: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    is_main: bool = True,
    broadcast: Callable[[Any], Any] = lambda x: x,
) -> dict[str, Any]:
    """Run (or resume) search ``name`` on ``store`` from ``checkpoint`` (w_share).

    The first proposals are the initial design (``design.initial_design``: the uniform
    sampler, steps in ``t``, a soft ramp), then Sobol' points, then the agent's; each trial runs
    the inner loop (``finetune``) with the proposed sampler and scores it on val. The uniform
    sampler is re-evaluated on ``guard.repeats`` seeds to measure the noise, and the guard
    compares the best candidates with it (``loop.GuardSettings``; with ``guard.inner_loop``
    "early" it compares them by resuming w_share's run for its last ``finetune.epochs`` epochs,
    the same fine-tune settings otherwise). With ``confirm``, the
    recommended sampler is then trained as ``w_share`` was and kept only if it beats it on val by more than
    one standard error (``search.confirm.keeps_sampler``)
    (``confirm.full_run_check``: one training run more; ``progress`` shows its bars, ``announce``
    gets a line before it starts). Returns ``loop.summarize``'s
    dict plus ``model`` (the checkpoint to use with the recommendation: ``checkpoint`` itself
    for the uniform sampler, the full-run check's run for a kept sampler, else None),
    ``epochs``, the inner-loop epochs spent by every trial (the search's cost), and
    ``trial_seconds``, the wall time of those trials (every session of the search together);
    ``{"search": name}`` on ranks other than 0.

    The samplers combine the feature pair the store's tables were built for (``build-features
    --features-pair``); ``search.json`` records it (``feature_pair``), so a search resumed after
    the tables were rebuilt for another pair is refused (one recording none ran over the
    default pair).

    ``search.json`` records ``workers`` and the number of ranks (``world_size``) with the other
    settings: both change every trial's score, so resuming with others is refused, naming them
    (a search.json without them, written before they were recorded, is resumed unchecked).
    """
    finetune = as_settings(InnerLoopSettings, finetune, name="finetune")
    guard = as_settings(GuardSettings, guard, name="guard")
    check_call(search, locals())
    objective = InnerLoopObjective(store, checkpoint, finetune or InnerLoopSettings(),
                                  workers=workers, device=device)
    guard = (guard or GuardSettings()).check()
    guard_objective = None
    if guard.enabled and guard.inner_loop != "search":
        # Built now, so a w_share without the checkpoint an "early" guard needs is refused
        # before the search rather than after it.
        try:
            guard_objective = InnerLoopObjective(store, checkpoint,
                                                replace(finetune or InnerLoopSettings(), start=guard.inner_loop),
                                                workers=workers, device=device)
        except StoreError as e:
            raise StoreError(f"the guard's inner loop: {e} (--guard-inner-loop; search: the "
                             "search's own)") from None
    if confirm:  # refuse now what the check would refuse after the whole search
        full_run_recipe(objective.info["checkpoint"], checkpoint)
    tables = load_tables(store)
    if objective.settings.features == "online":
        check_online(tables.pair)  # refused now, not at the first trial
    design = tuple(initial_design(tables, transform))
    params = create_agent(agent, seed=seed, initial_points=design).get_params()
    info = objective.info
    settings = {
        "store_id": info["store_id"], "checkpoint_sha256": info["features_checkpoint_sha256"],
        "transform": transform, "feature_pair": tables.pair.record(),
        "finetune": objective.describe(), "initial_design": DESIGN_VERSION,
        "agent_params": {k: v for k, v in params.items() if k not in ("seed", "initial_points")},
        # Both change every trial's data order (shards and samples are split by global worker),
        # hence its score: a search resumed with others would mix incomparable trials.
        "workers": int(workers), "world_size": init_distributed(device).world_size,
    }
    if guard_objective is not None:
        settings["guard_finetune"] = guard_objective.describe()

    def make_sampler(z) -> Sampler:
        return Sampler.from_point(z, tables, transform)

    provenance = {"store_id": info["store_id"],
                  "features_checkpoint_sha256": info["features_checkpoint_sha256"],
                  # the stage the sampler was chosen through; `train --sampler` uses it by default
                  "learned_with": {"features": objective.settings.features,
                                   "selection": objective.settings.selection}}
    summary = run_search(
        store, name, objective, make_sampler, settings=settings, steps=steps, agent=agent,
        seed=seed, initial_points=design, trial_seeds=trial_seeds, guard=guard,
        guard_objective=guard_objective, provenance=provenance, on_trial=on_trial, is_main=is_main, broadcast=broadcast)
    if confirm:
        full_run_check(store, name, objective, make_sampler, provenance=provenance,
                       progress=progress, announce=announce, is_main=is_main, broadcast=broadcast)
        if is_main:
            summary = summarize(store, name)
    if not is_main:  # the files are rank 0's
        return summary
    trials = read_trials(Path(summary["trials_path"]))
    # The full-run check's run is the model a kept sampler comes with, not search cost.
    return {**summary, "model": _model_to_use(summary, checkpoint),
            "epochs": int(sum(t["epochs"] for t in trials)),
            "trial_seconds": round(sum(float(t["seconds"] or 0.0) for t in trials), 2)}


def _model_to_use(summary: dict[str, Any], checkpoint: str | Path) -> str | None:
    """The checkpoint that goes with the recommendation: w_share for the uniform sampler, the
    full-run check's run for a kept one; None before a recommended sampler was trained."""
    if summary.get("choice") == "uniform":
        return str(checkpoint)
    confirm = summary.get("confirm") or {}
    return confirm.get("checkpoint") if confirm.get("kept") else None
