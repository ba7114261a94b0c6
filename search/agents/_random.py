"""Random search: the baseline every other agent must beat."""

from __future__ import annotations

import numpy as np

from ..space import uniform_points
from ._base import Agent


class RandomAgent(Agent):
    """Proposes the initial points, then independent uniform points of [0,1]^dim.

    Step ``n`` draws from a generator seeded by ``(seed, n)``, so the proposals depend only on
    the seed and the number of observations (the scores are ignored).
    """

    name = "random"

    def _propose(self, points: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return uniform_points(self.step_rng(), 1, self.dim)[0]
