"""search: the outer loop of the Swift Sampler (arXiv 2410.05578, §3.3-3.4, Algorithm 1).

    from swift_sampler.search import InnerLoopObjective, InnerLoopSettings, run_search
    objective = InnerLoopObjective(store, "STORE/runs/w_share/checkpoint.pt", InnerLoopSettings(epochs=5))
    summary = run_search(store, "ss", objective, make_sampler, settings=..., steps=40)

``agents`` (GP-UCB, random; ask/tell over [0,1]^10), ``space`` (the cube), ``objective`` (the
inner loop: fine-tune ``w_share`` with a sampler, score top-1 on val) and ``loop`` (resumable
``run_search`` writing ``STORE/searches/NAME``). The objective imports torch and the trainer;
it is loaded on first use so that agents and the loop stay light.
"""

from __future__ import annotations

from typing import Any

# Every name loads on first use (PEP 562): the command line reads ``search.settings`` while
# building its parser, and must not pay for scikit-learn (agents) or torch (objective) there.
_HOME = {
    "AGENTS": "agents", "create_agent": "agents",
    "TrialResult": "loop", "best_so_far": "loop", "best_trial": "loop", "read_settings": "loop",
    "read_trials": "loop", "run_search": "loop", "summarize": "loop",
    "InnerLoopSettings": "settings", "GuardSettings": "settings",
    "InnerLoopObjective": "objective", "check_search_inputs": "objective",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")


__all__ = ["AGENTS", "InnerLoopObjective", "InnerLoopSettings", "GuardSettings", "TrialResult", "best_so_far",
           "best_trial", "check_search_inputs", "create_agent", "read_settings", "read_trials",
           "run_search", "summarize"]
