"""The search's initial design: the uniform sampler, then a few canonical shapes.

Before the Sobol' points and the GP, the search tries shapes a practitioner would try by hand,
all in ``t`` along the first feature's direction (``c = (1, 0)``: ``t`` is the cgf, or cdf, of
``f1``, the per-crop loss under ``w_share`` for the paper's pair; ``c = (-1, 0)`` for a first
feature whose low values mark wrong labels): steps that keep the
low-``t`` crops and drop the rest at three cut points, and a soft ramp. None of them knows the noise rate; together they put the GP's first
observations where sample selection usually helps, so a short search does not spend its budget
finding that region at random.
"""

from __future__ import annotations

import numpy as np

from swift_sampler.pipeline.sampler.function import Sampler, uniform_sampler
from swift_sampler.pipeline.sampler.pair import noisy_end

STEP_CUTS = (0.3, 0.5, 0.7)
DESIGN_VERSION = "uniform+steps(0.3,0.5,0.7)+ramp"


def canonical_samplers(tables, transform: str = "cgf") -> list[tuple[str, Sampler]]:
    """``[(name, Sampler)]``: uniform, ``step-<cut>`` for each cut of ``STEP_CUTS``, ``ramp``.

    The shapes keep the crops at the clean end of the first feature: ``c1 = 1`` where a high
    value marks a likely wrong label (the loss), ``c1 = -1`` where a low one does (the margin,
    the probability of the given label), so that low ``t`` is the clean end either way.
    """
    c1 = float(noisy_end(tables.pair.features[0]))
    shapes = [("uniform", uniform_sampler(tables, transform))]
    for cut in STEP_CUTS:
        shapes.append((f"step-{cut:g}", Sampler((0.0, cut, cut, 1.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0),
                                                c1, 0.0, transform, tables)))
    shapes.append(("ramp", Sampler((0.0, 0.4, 0.6, 0.8, 1.0), (1.0, 1.0, 0.55, 0.1, 0.1),
                                   c1, 0.0, transform, tables)))
    return shapes


def initial_design(tables, transform: str = "cgf") -> list[np.ndarray]:
    """Points of ``canonical_samplers`` in order; the first is the uniform sampler."""
    return [s.to_point() for _, s in canonical_samplers(tables, transform)]


__all__ = ["DESIGN_VERSION", "STEP_CUTS", "canonical_samplers", "initial_design"]
