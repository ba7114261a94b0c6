"""GP-UCB: Bayesian optimisation with a Gaussian process and the upper confidence bound.

Paper §3.3: a GP with an RBF kernel and a constant mean equal to the mean score of the tried
samplers; UCB acquisition. Here:

- Kernel ``C * RBF(length_scale per dimension) + White``: one length scale per parameter
  (automatic relevance determination: some of the 10 parameters matter little), and a noise
  term because a score is a noisy fine-tune result (§3.3, step 2).
- ``normalize_y=True``: the GP models ``(score - mean) / std``, i.e. a constant prior mean equal
  to the mean of the observed scores, as in the paper; the standardisation also makes the
  amplitude and noise bounds meaningful whatever the score's scale. Equal scores (std 0) are
  handled by scikit-learn (scale 1).
- Acquisition ``mu + sqrt(beta_t) * sigma`` with the GP-UCB schedule of Srinivas et al. (2010,
  Theorem 1): ``beta_t = 2 log(d t^2 pi^2 / (6 delta))``, ``t`` the index of the step being
  proposed, scaled by ``beta_scale``. The theorem's value is known to over-explore; Srinivas
  et al. (§6) scale it down by a factor 5 in their experiments, which is the default here
  (``beta_scale=0.2``, ``delta=0.1``: ``sqrt(beta_t)`` grows from 1.9 at t=6 to 2.3 at t=40).
- The acquisition is maximised over [0,1]^dim with nevergrad's ``TwoPointsDE`` (differential
  evolution), asking ``batch_size`` candidates at a time so that the GP predicts a whole batch in
  one call. ``TwoPointsDE`` is pure numpy and single-threaded; nevergrad's default ``NGOpt``
  fails under numpy 2.4 (``TypeError: only 0-dimensional arrays can be converted to Python
  scalars``, nevergrad issue #1612) and its leftover CMA thread hangs the process at exit.
  The search starts from (is ``suggest``-ed) the best points of a candidate pool made of the
  best observed points, Gaussian perturbations of them, and uniform points; the proposal is the
  best point evaluated anywhere, so it is never worse (by the acquisition) than the pool.

Proposal order: ``initial_points``, then ``n_sobol`` scrambled Sobol' points (seeded), then
GP-UCB. Every random choice of step ``n`` is seeded by ``(seed, n)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from threadpoolctl import threadpool_limits

from swift_sampler.storage.errors import UsageError

from ..space import sobol_points, uniform_points
from ._base import Agent

# Length scales on the unit cube: below 0.05 neighbouring samples are unrelated (the GP could
# only interpolate noise); above 20 a parameter is irrelevant over the whole range.
LENGTH_SCALE_BOUNDS = (0.05, 20.0)
# On standardised scores: amplitude and noise variances relative to the score variance.
AMPLITUDE_BOUNDS = (1e-2, 1e2)
NOISE_BOUNDS = (1e-5, 1.0)

# Streams of the per-step generator (see Agent.step_rng).
_STREAM_POOL, _STREAM_GP, _STREAM_DE = 1, 2, 3


def fit_gp(points: np.ndarray, scores: np.ndarray, *, noise_sd: float | None = None, seed: int = 0,
           n_restarts: int = 2) -> GaussianProcessRegressor:
    """The GP of the search: ``C * RBF(ARD) + White`` on standardised scores, fitted.

    ``noise_sd`` (score units) bounds the white-noise sd below: on the standardised scale the
    bound is ``(noise_sd / std(scores))**2``, so a lucky outlier cannot be fitted as signal
    when the measured seed noise says it could be luck.
    """
    low, high = NOISE_BOUNDS
    spread = float(np.std(scores))
    if noise_sd is not None and noise_sd > 0 and spread > 0:
        low = max(low, (float(noise_sd) / spread) ** 2)
        high = max(high, 4.0 * low)
    kernel = ConstantKernel(1.0, AMPLITUDE_BOUNDS) * RBF(
        np.full(points.shape[1], 0.5), LENGTH_SCALE_BOUNDS
    ) + WhiteKernel(min(max(0.1, low), high), (low, high))
    gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=n_restarts,
                                  random_state=int(seed))
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # Length scales at a bound are expected (irrelevant parameters, few points); the
        # fit is still the best within the declared bounds.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gp.fit(points, scores)


class GPUCBAgent(Agent):
    """GP-UCB agent (paper §3.3). See the module docstring for the choices and their reasons.

    Args:
        dim, seed, initial_points: see ``Agent``.
        n_sobol: quasi-random points proposed after the initial points, before the GP is used.
        beta_scale, delta: the UCB schedule ``beta_scale * 2 log(d t^2 pi^2 / (6 delta))``.
        n_restarts_optimizer: restarts of the GP's marginal-likelihood optimiser (seeded).
        acquisition_budget: acquisition evaluations by the differential evolution.
        batch_size: candidates asked (and predicted by the GP) at once.
        n_pool: uniform points in the starting pool of the acquisition search.

    Attributes:
        gp_: the ``GaussianProcessRegressor`` fitted at the last GP-UCB proposal.
        beta_: the ``beta_t`` used at the last GP-UCB proposal.
    """

    name = "gp-ucb"

    def __init__(
        self,
        dim: int = 10,
        seed: int = 0,
        initial_points: Sequence[Any] = (),
        *,
        n_sobol: int = 5,
        beta_scale: float = 0.2,
        delta: float = 0.1,
        n_restarts_optimizer: int = 2,
        acquisition_budget: int = 1000,
        batch_size: int = 100,
        n_pool: int = 1000,
    ) -> None:
        super().__init__(dim=dim, seed=seed, initial_points=initial_points)
        self.n_sobol = n_sobol
        self.beta_scale = beta_scale
        self.delta = delta
        self.n_restarts_optimizer = n_restarts_optimizer
        self.acquisition_budget = acquisition_budget
        self.batch_size = batch_size
        self.n_pool = n_pool

    def check_params(self) -> GPUCBAgent:
        super().check_params()
        for name in ("n_sobol", "n_restarts_optimizer", "acquisition_budget", "n_pool"):
            if int(getattr(self, name)) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if int(self.batch_size) < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not self.beta_scale >= 0:
            raise UsageError(f"beta_scale must be >= 0, got {self.beta_scale!r}")
        if not 0 < self.delta < 1:
            raise UsageError(f"delta must be in (0, 1), got {self.delta!r}")
        return self

    def beta(self, t: int) -> float:
        """``beta_t`` of the UCB at step ``t >= 1`` (1-based index of the proposal)."""
        return self.beta_scale * 2.0 * math.log(self.dim * t**2 * math.pi**2 / (6.0 * self.delta))

    def _propose(self, points: np.ndarray, scores: np.ndarray) -> np.ndarray:
        n = len(points)
        k = n - len(self.initial_points)  # proposals already made after the initial points
        if 0 <= k < self.n_sobol:
            return sobol_points(self.n_sobol, self.dim, seed=int(self.seed))[k]
        if n < 2:  # nothing to fit yet (history shorter than the planned start)
            return uniform_points(self.step_rng(_STREAM_POOL), 1, self.dim)[0]
        # BLAS threads only slow down 40x40 algebra (and fight the trainer for cores): on a
        # loaded 2-core machine a step took 17 s with the default pool and 1.2 s with one thread.
        with threadpool_limits(limits=1, user_api="blas"):
            self.gp_ = self._fit(points, scores)
            self.beta_ = self.beta(n + 1)
            return self._maximise_ucb(points, scores, math.sqrt(self.beta_))

    def _fit(self, points: np.ndarray, scores: np.ndarray) -> GaussianProcessRegressor:
        seed = int(self.step_rng(_STREAM_GP).integers(2**31 - 1))
        return fit_gp(points, scores, noise_sd=getattr(self, "noise_sd_", None), seed=seed,
                      n_restarts=int(self.n_restarts_optimizer))

    def set_noise(self, noise_sd: float | None) -> None:
        """Bound the GP's noise sd below by ``noise_sd`` (score units; measured by the loop
        from repeated evaluations of one sampler). Part of the history, not of the arguments."""
        self.noise_sd_ = None if noise_sd is None else float(noise_sd)
        self._asked = None

    def _maximise_ucb(self, points: np.ndarray, scores: np.ndarray, kappa: float) -> np.ndarray:
        import nevergrad as ng  # slow import; only GP-UCB steps need it

        def ucb(x: np.ndarray) -> np.ndarray:
            mu, sigma = self.gp_.predict(x, return_std=True)
            return mu + kappa * sigma

        rng = self.step_rng(_STREAM_POOL)
        top = points[np.argsort(-scores, kind="stable")[: min(5, len(points))]]
        local = np.clip(np.repeat(top, 20, axis=0) + rng.normal(0, 0.05, (20 * len(top), self.dim)), 0, 1)
        pool = np.concatenate([top, local, uniform_points(rng, int(self.n_pool), self.dim)])
        values = ucb(pool)
        best_x, best_v = pool[np.argmax(values)], float(values.max())

        budget = int(self.acquisition_budget)
        if budget > 0:
            param = ng.p.Array(shape=(self.dim,), lower=0.0, upper=1.0)
            param.random_state = np.random.RandomState(int(self.step_rng(_STREAM_DE).integers(2**31 - 1)))
            batch = min(int(self.batch_size), budget)
            opt = ng.optimizers.TwoPointsDE(parametrization=param, budget=budget, num_workers=batch)
            for i in np.argsort(-values, kind="stable")[: min(batch, 10)]:
                opt.suggest(pool[i])
            for _ in range(budget // batch):
                cands = [opt.ask() for _ in range(batch)]
                x = np.clip(np.stack([c.value for c in cands]), 0.0, 1.0)
                v = ucb(x)
                for c, vi in zip(cands, v):
                    opt.tell(c, -float(vi))  # nevergrad minimises
                if v.max() > best_v:
                    best_x, best_v = x[np.argmax(v)], float(v.max())
        return best_x
