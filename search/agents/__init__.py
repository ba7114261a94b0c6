"""Search agents speaking ask/tell over the cube [0,1]^dim.

    agent = create_agent("gp-ucb", dim=10, seed=0, initial_points=[uniform_point])
    for _ in range(40):
        z = agent.ask()
        agent.tell(z, evaluate(z))

Proposals are a deterministic function of (seed, arguments, history of tells): replaying the
stored history into a fresh agent resumes a search exactly (see ``Agent``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from swift_sampler.storage.errors import UsageError

from ._base import Agent
from ._gp_ucb import GPUCBAgent
from ._random import RandomAgent

AGENTS: dict[str, type[Agent]] = {cls.name: cls for cls in (GPUCBAgent, RandomAgent)}


def create_agent(
    name: str, *, dim: int = 10, seed: int = 0, initial_points: Sequence[Any] = (), **kwargs: Any
) -> Agent:
    """Create the agent called ``name`` (one of ``AGENTS``) with validated arguments.

    Raises:
        ValueError: unknown name, unknown keyword, or an invalid argument.
    """
    if name not in AGENTS:
        raise UsageError(f"unknown agent {name!r}; choose one of: {', '.join(sorted(AGENTS))}")
    # An unknown keyword is the caller's mistake; a TypeError from inside the agent is a bug
    # and keeps its traceback.
    params = inspect.signature(AGENTS[name]).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = ", ".join(k for k in params if k not in ("dim", "seed", "initial_points"))
        raise UsageError(f"agent {name!r}: unknown option(s) {', '.join(unknown)}; it takes {known}")
    agent = AGENTS[name](dim=dim, seed=seed, initial_points=tuple(initial_points), **kwargs)
    return agent.check_params()


__all__ = ["AGENTS", "Agent", "GPUCBAgent", "RandomAgent", "create_agent"]
