"""The ask/tell contract every agent follows.

Invariants (the resumable search loop relies on them):

- ``ask()`` is a pure function of ``(seed, constructor arguments, initial_points, history)``,
  where the history is the ordered list of ``tell(point, score)`` calls. No random state is
  carried between steps: step ``n`` (``n`` observations so far) draws from a generator seeded
  by ``(seed, n, stream)``. Hence a fresh agent fed the stored history with ``tell`` asks
  exactly what the agent that lived through it would have asked next.
- ``ask()`` does not change the history: asking twice without a ``tell`` in between returns
  the same point (computed once, then cached).
- The first ``len(initial_points)`` proposals are the initial points, in order.
- Every proposal is a float64 array of shape ``(dim,)`` inside [0,1]^dim.
- ``tell`` accepts any point of the cube (not only asked ones) and a finite score; higher is
  better. Failed evaluations are the caller's to map to a finite (worst) score.

Agents follow the scikit-learn contract: ``__init__`` stores its arguments only, validation
happens at first use (``check_params``; ``create_agent`` calls it), and learned state ends in
``_`` (``points_``, ``scores_``, and model attributes such as ``gp_``).
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from swift_sampler.storage.errors import UsageError

from ..space import check_point


class Agent(abc.ABC):
    """Base class: proposes points of [0,1]^dim to maximise a noisy score.

    Args:
        dim: dimension of the cube (10 for the Swift Sampler).
        seed: seed of every random choice the agent makes.
        initial_points: points proposed first, in order (e.g. the uniform sampler's point).
    """

    name: ClassVar[str] = ""

    def __init__(self, dim: int = 10, seed: int = 0, initial_points: Sequence[Any] = ()) -> None:
        self.dim = dim
        self.seed = seed
        self.initial_points = initial_points

    # -- parameters ------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments by name (what defines the agent, for ``search.json``)."""
        names = [
            p.name
            for cls in type(self).__mro__
            if cls is not object
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
            if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
        ]
        params = {n: getattr(self, n) for n in dict.fromkeys(names)}
        params["initial_points"] = [np.asarray(z, dtype=float).tolist() for z in self.initial_points]
        return params

    def check_params(self) -> Agent:
        """Validate the constructor arguments; raises ``ValueError`` naming the bad one."""
        if not isinstance(self.dim, int | np.integer) or self.dim < 1:
            raise UsageError(f"dim must be a positive integer, got {self.dim!r}")
        if not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {self.seed!r}")
        for i, z in enumerate(self.initial_points):
            try:
                check_point(z, self.dim)
            except ValueError as e:
                raise UsageError(f"initial_points[{i}]: {e}") from None
        return self

    # -- ask / tell ------------------------------------------------------------------------
    @property
    def observations(self) -> tuple[np.ndarray, np.ndarray]:
        """Told points ``(n, dim)`` float64 and scores ``(n,)`` float64, in telling order."""
        points = getattr(self, "points_", [])
        scores = getattr(self, "scores_", [])
        return np.array(points, dtype=np.float64).reshape(len(points), self.dim), np.array(
            scores, dtype=np.float64
        )

    @property
    def n_observations(self) -> int:
        return len(getattr(self, "points_", []))

    def tell(self, point: Any, score: float) -> None:
        """Record that ``point`` scored ``score`` (finite; higher is better)."""
        if not hasattr(self, "points_"):
            self.check_params()
            self.points_: list[np.ndarray] = []
            self.scores_: list[float] = []
        z = check_point(point, self.dim)
        s = float(score)
        if not math.isfinite(s):
            raise UsageError(
                f"score must be finite, got {score!r}; record a failed evaluation with the "
                "worst score seen instead"
            )
        self.points_.append(z)
        self.scores_.append(s)

    def ask(self) -> np.ndarray:
        """The next point to evaluate: float64 ``(dim,)`` in [0,1]^dim (see module invariants)."""
        n = self.n_observations
        cached = getattr(self, "_asked", None)
        if cached is not None and cached[0] == n:
            return cached[1].copy()
        if n == 0:
            self.check_params()
        if n < len(self.initial_points):
            z = check_point(self.initial_points[n], self.dim)
        else:
            points, scores = self.observations
            z = check_point(self._propose(points, scores), self.dim)
        self._asked = (n, z)
        return z.copy()

    def step_rng(self, stream: int = 0) -> np.random.Generator:
        """Generator for the current step: a function of ``(seed, n_observations, stream)``."""
        return np.random.default_rng([int(self.seed), self.n_observations, stream])

    @abc.abstractmethod
    def _propose(self, points: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Propose the next point from the history (points ``(n, dim)``, scores ``(n,)``)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k != "initial_points")
        return f"{type(self).__name__}({args}, initial_points=<{len(self.initial_points)}>)"
