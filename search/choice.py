"""Which tried sampler to recommend: robust to the score's noise, never worse than uniform.

With a noisy inner loop the arg-max of the raw scores is mostly the luckiest seed (the
winner's curse). Two defences, both from the recorded trials alone:

- **Posterior mean.** The recommendation is the tried point with the highest mean of a GP
  fitted to every finished search trial (the GP-UCB agent's model), not the highest raw
  score; Ax recommends the same way for noisy objectives. The GP's noise level is bounded
  below by the seed noise measured for this inner loop on this store (``measured_noise``), so
  the GP cannot explain a lucky outlier as signal.
- **The no-harm guard.** The top candidates by posterior mean and the uniform sampler are
  evaluated again on the same fresh seeds (common random numbers; never on the seed of the
  trial that made a candidate look good, which would carry its luck into the test). A candidate
  is recommended only when its mean paired gain over uniform exceeds ``margin`` =
  ``t(0.975, dof) * sd * sqrt(2 / repeats)``: a one-sided 2.5% test of a difference of two
  means of ``repeats`` evaluations, with ``sd`` the within-sampler sd pooled over every repeated
  evaluation (uniform's and the candidates'; a Student t because that sd is itself estimated from
  a handful of runs). Pairing only lowers the true error, so the rule is conservative.
  Otherwise the recommendation is the uniform sampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from .agents._gp_ucb import fit_gp

GUARD_LEVEL = 0.975  # one-sided: a flat objective passes a given candidate 2.5% of the time


def measured_noise(scores: Sequence[float]) -> float | None:
    """Sample sd (ddof 1) of repeated evaluations of one sampler; None for fewer than 2."""
    s = np.asarray([x for x in scores if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(np.std(s, ddof=1)) if len(s) >= 2 else None


def posterior_means(points: np.ndarray, scores: np.ndarray, *, noise_sd: float | None = None,
                    seed: int = 0) -> np.ndarray:
    """GP posterior mean at each tried point, float64 ``(n,)``; the scores themselves for n < 3.

    Args:
        points: ``(n, dim)`` points of the cube; scores: ``(n,)`` finite scores.
        noise_sd: lower bound of the GP's noise sd, in score units (None: free).
        seed: seed of the marginal-likelihood restarts.
    """
    points = np.asarray(points, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 3 or np.ptp(scores) == 0:
        return scores.copy()
    gp = fit_gp(points, scores, noise_sd=noise_sd, seed=seed, n_restarts=2)
    return gp.predict(points)


def rank_candidates(trials: list[dict[str, Any]], *, exclude: np.ndarray | None = None,
                    noise_sd: float | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Distinct tried points of the finished search trials, best posterior mean first.

    Each entry: ``trial`` (first trial of the point), ``point``, ``score`` (its raw score),
    ``posterior_mean``. Points equal to ``exclude`` (the uniform sampler) are left out.
    """
    ok = [t for t in trials if t["status"] == "ok" and t.get("phase", "search") == "search"]
    if not ok:
        return []
    points = np.array([t["point"] for t in ok], dtype=np.float64)
    scores = np.array([t["score"] for t in ok], dtype=np.float64)
    means = posterior_means(points, scores, noise_sd=noise_sd, seed=seed)
    order = sorted(range(len(ok)), key=lambda i: (-means[i], ok[i]["trial"]))
    seen, out = [], []
    for i in order:
        z = points[i]
        if exclude is not None and np.allclose(z, exclude, atol=1e-12):
            continue
        if any(np.allclose(z, s, atol=1e-12) for s in seen):
            continue
        seen.append(z)
        out.append({"trial": int(ok[i]["trial"]), "point": z.tolist(), "score": float(scores[i]),
                    "posterior_mean": float(means[i])})
    return out


def pooled_noise(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """Within-group sd pooled over groups of repeated evaluations, and its degrees of freedom."""
    ss, dof = 0.0, 0
    for g in groups:
        x = np.asarray([v for v in g if v is not None and math.isfinite(v)], dtype=np.float64)
        if len(x) >= 2:
            ss += float(((x - x.mean()) ** 2).sum())
            dof += len(x) - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


def guard_decision(candidates: list[dict[str, Any]], uniform_scores: Sequence[float], *,
                   uniform_extra: Sequence[float] = ()) -> dict[str, Any]:
    """The no-harm rule on paired evaluations.

    Args:
        candidates: entries with ``trial`` and ``scores`` (one per guard seed, aligned with
            ``uniform_scores``; None where that evaluation failed).
        uniform_scores: the uniform sampler's scores on the guard seeds.
        uniform_extra: further evaluations of the uniform sampler (other seeds), used for the
            noise estimate only.

    Returns:
        ``{"winner": trial or None, "margin", "noise_sd", "dof", "gains": {trial: mean paired
        gain}, "reason"}``.
    """
    u = np.asarray([np.nan if x is None else x for x in uniform_scores], dtype=np.float64)
    repeats = len(u)
    groups = [[*u.tolist(), *uniform_extra], *[c["scores"] for c in candidates]]
    sd, dof = pooled_noise(groups)
    if sd is None or repeats < 2 or not np.all(np.isfinite(u)):
        return {"winner": None, "margin": None, "noise_sd": sd, "dof": dof, "gains": {},
                "reason": "the inner loop's noise could not be measured (a uniform re-evaluation "
                          "failed or too few ran); the uniform sampler is kept"}
    margin = float(student_t.ppf(GUARD_LEVEL, dof) * sd * math.sqrt(2.0 / repeats))
    gains: dict[int, float] = {}
    for c in candidates:
        s = np.array([np.nan if x is None else x for x in c["scores"]], dtype=np.float64)
        if len(s) != repeats or not np.all(np.isfinite(s)):
            continue  # a failed re-evaluation disqualifies the candidate
        gains[int(c["trial"])] = float(np.mean(s - u))
    best = max(gains, key=lambda t: (gains[t], -t), default=None)
    out = {"margin": margin, "noise_sd": sd, "dof": dof, "gains": gains}
    if best is not None and gains[best] > margin:
        return {**out, "winner": best,
                "reason": f"trial {best} beats the uniform sampler by {gains[best]:.4f} on "
                          f"{repeats} common seeds (margin {margin:.4f})"}
    top = f"the best gain was {gains[best]:.4f}" if best is not None else "no candidate finished"
    return {**out, "winner": None,
            "reason": f"no candidate beats the uniform sampler by more than the measured noise "
                      f"(margin {margin:.4f}; {top}); the uniform sampler is recommended"}


__all__ = ["GUARD_LEVEL", "guard_decision", "pooled_noise", "measured_noise", "posterior_means", "rank_candidates"]
