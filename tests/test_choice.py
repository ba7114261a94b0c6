"""The recommendation: posterior mean over raw arg-max, the GP's noise floor, the no-harm guard,
and a resumed guarded search that asks and records exactly what an uninterrupted one would."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_search_loop import make_store

from swift_sampler.pipeline.sampler.function import Sampler, uniform_sampler
from swift_sampler.search.agents._gp_ucb import fit_gp
from swift_sampler.search.choice import (
    guard_decision,
    measured_noise,
    pooled_noise,
    rank_candidates,
)
from swift_sampler.search.design import canonical_samplers, initial_design
from swift_sampler.search.loop import GuardSettings, TrialResult, read_trials, run_search, summarize
from swift_sampler.storage import StoreError, StoreLayout
from swift_sampler.storage.errors import UsageError


class Toy:
    """``score = signal(point) + N(0, sd)`` drawn from ``(seed, point)``; records every call."""

    def __init__(self, signal, sd=0.01, cut_at=None):
        self.signal, self.sd, self.cut_at = signal, sd, cut_at
        self.calls = []

    def __call__(self, sampler: Sampler, seed: int) -> TrialResult:
        z = sampler.to_point()
        self.calls.append((z, seed))
        if self.cut_at is not None and len(self.calls) - 1 == self.cut_at:
            raise KeyboardInterrupt("cut off mid-trial")
        key = [seed, *np.round(z * 1e6).astype(np.int64).tolist()]
        noise = np.random.default_rng(key).normal(0, self.sd)
        return TrialResult(score=float(self.signal(z) + noise), epochs=1)


def run(store, name, objective, tables, *, steps=8, seed=0, trial_seeds="common", guard=None):
    design = tuple(initial_design(tables, "cgf"))
    return run_search(store, name, objective, lambda z: Sampler.from_point(z, tables, "cgf"),
                      settings={"transform": "cgf"}, steps=steps, seed=seed, initial_points=design,
                      trial_seeds=trial_seeds,
                      # one toy objective: the guard re-runs it (the early loop is another objective)
                      guard=guard or GuardSettings(inner_loop="search"))


# -- posterior mean ---------------------------------------------------------------------------
def test_posterior_mean_choice_differs_from_argmax_with_a_lucky_outlier():
    rng = np.random.default_rng(1)
    # Six points of a good region (first coordinate near 0.8, true score 0.60) and seven of a
    # slightly worse one (near 0.2, true 0.59), one of which got lucky by three noise sd.
    sd = 0.01
    first = np.r_[rng.normal(0.8, 0.03, 6), rng.normal(0.2, 0.03, 7)]
    points = np.c_[first, np.full((13, 9), 0.5) + rng.normal(0, 0.01, (13, 9))].clip(0, 1)
    scores = np.where(first > 0.5, 0.60, 0.59) + rng.normal(0, sd, 13).clip(-1.5 * sd, 1.5 * sd)
    scores[-1] = 0.59 + 3 * sd  # the lucky outlier
    trials = [{"trial": i, "point": p.tolist(), "score": float(s), "status": "ok", "phase": "search"}
              for i, (p, s) in enumerate(zip(points, scores))]
    ranked = rank_candidates(trials, noise_sd=sd)
    assert int(np.argmax(scores)) == 12
    assert ranked[0]["trial"] != 12
    assert points[ranked[0]["trial"], 0] > 0.5  # from the good region


def test_gp_noise_is_bounded_below_by_the_measured_noise():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (12, 10))
    scores = points[:, 0] * 0.1 + rng.normal(0, 0.001, 12)
    free = fit_gp(points, scores, seed=0)
    floor_sd = 0.02
    bounded = fit_gp(points, scores, noise_sd=floor_sd, seed=0)
    floor = (floor_sd / np.std(scores)) ** 2
    assert bounded.kernel_.k2.noise_level >= floor * (1 - 1e-9)
    assert free.kernel_.k2.noise_level < floor


def test_measured_noise_is_the_sample_sd():
    assert measured_noise([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert measured_noise([1.0]) is None
    assert measured_noise([1.0, None, math.nan, 3.0]) == pytest.approx(math.sqrt(2.0))


# -- the guard rule ---------------------------------------------------------------------------
def test_guard_passes_a_clear_winner_and_refuses_a_gain_within_the_noise():
    uniform = [0.50, 0.51, 0.49]
    clear = guard_decision([{"trial": 4, "scores": [0.56, 0.57, 0.55]},
                            {"trial": 7, "scores": [0.52, 0.52, 0.50]}], uniform)
    assert clear["winner"] == 4 and clear["gains"][4] == pytest.approx(0.06)
    assert clear["dof"] == 6 and clear["noise_sd"] == pytest.approx(pooled_noise(
        [uniform, [0.56, 0.57, 0.55], [0.52, 0.52, 0.50]])[0])
    small = guard_decision([{"trial": 7, "scores": [0.51, 0.52, 0.50]}], uniform)
    assert small["winner"] is None and "uniform sampler is recommended" in small["reason"]
    failed = guard_decision([{"trial": 4, "scores": [0.9, None, 0.9]}], uniform)
    assert failed["winner"] is None
    broken_uniform = guard_decision([{"trial": 4, "scores": [0.9, 0.9, 0.9]}], [0.5, None, 0.5])
    assert broken_uniform["winner"] is None


def test_pooled_noise_against_the_textbook_formula():
    groups = [[1.0, 2.0, 4.0], [3.0, 5.0], [7.0]]
    sd, dof = pooled_noise(groups)
    assert dof == 3
    assert sd == pytest.approx(math.sqrt((2 * np.var([1, 2, 4], ddof=1) + np.var([3, 5], ddof=1)) / 3))


def test_initial_design_starts_with_uniform_then_canonical_shapes(tables):
    names = [n for n, _ in canonical_samplers(tables)]
    assert names == ["uniform", "step-0.3", "step-0.5", "step-0.7", "ramp"]
    points = initial_design(tables)
    np.testing.assert_allclose(points[0], uniform_sampler(tables).to_point())
    step = Sampler.from_point(points[2], tables, "cgf")
    assert step.h(0.49) == 1.0 and step.h(0.5) == 0.0


# -- the guard in a search --------------------------------------------------------------------
def test_guard_false_positive_rate_on_a_flat_objective_is_near_its_level():
    # 4000 simulated guards, two candidates each, every sampler equally good: the test is
    # one-sided at 2.5% per candidate, so about 5% of the guards may pass one of the two.
    rng = np.random.default_rng(0)
    passed = 0
    for _ in range(4000):
        u = rng.normal(0.5, 0.01, 3)
        cands = [{"trial": t, "scores": rng.normal(0.5, 0.01, 3).tolist()} for t in (1, 2)]
        passed += guard_decision(cands, u.tolist(), uniform_extra=[rng.normal(0.5, 0.01)])["winner"] is not None
    assert 0.02 < passed / 4000 < 0.07


@pytest.mark.parametrize("seed", [1, 4, 5])
def test_guard_recommends_uniform_when_the_objective_is_flat_plus_noise(tmp_path, tables, seed):
    store = make_store(tmp_path / "store")
    summary = run(store, "flat", Toy(lambda z: 0.5, sd=0.01), tables, steps=8, seed=seed,
                  trial_seeds="distinct")
    assert summary["choice"] == "uniform"
    trials = read_trials(StoreLayout(store).search("flat") / "trials.parquet")
    phases = [t["phase"] for t in trials]
    assert phases.count("search") == 8 and phases.count("noise") == 3 and phases.count("guard") == 6
    best = json.loads((StoreLayout(store).search("flat") / "best_sampler.json").read_text())
    assert best["parameters"]["c1"] == 0 and best["parameters"]["c2"] == 0  # the uniform sampler
    assert summary["raw_best_trial"] != 0  # the raw arg-max was a lucky non-uniform point


def test_guard_recommends_a_real_improvement(tmp_path, tables):
    store = make_store(tmp_path / "store")
    target = initial_design(tables)[2]  # step-0.5 is truly better

    def signal(z):
        return 0.5 + 0.05 * math.exp(-float(np.sum((z - target) ** 2)) / 0.05)

    summary = run(store, "real", Toy(signal, sd=0.005), tables, steps=8)
    assert summary["choice"] == "guard"
    assert summary["guard"]["winner"] == summary["best_trial"]
    trials = read_trials(StoreLayout(store).search("real") / "trials.parquet")
    np.testing.assert_allclose(trials[summary["best_trial"]]["point"], target)


@pytest.mark.parametrize("cut", [1, 6, 11])  # during the noise trials, the search, the guard
def test_resumed_guarded_search_matches_an_uninterrupted_one(tmp_path, tables, cut):
    store = make_store(tmp_path / "store")
    signal = lambda z: 0.5 + 0.02 * z[3]  # noqa: E731
    run(store, "straight", Toy(signal), tables, steps=7, trial_seeds="distinct")
    with pytest.raises(KeyboardInterrupt):
        run(store, "resumed", Toy(signal, cut_at=cut), tables, steps=7, trial_seeds="distinct")
    again = Toy(signal)
    run(store, "resumed", again, tables, steps=7, trial_seeds="distinct")
    layout = StoreLayout(store)
    a = read_trials(layout.search("straight") / "trials.parquet")
    b = read_trials(layout.search("resumed") / "trials.parquet")
    keys = ("point", "seed", "phase", "score", "status")
    assert [[t[k] for k in keys] for t in a] == [[t[k] for k in keys] for t in b]
    assert len(again.calls) == len(b) - cut  # nothing repeated but the cut trial
    assert summarize(store, "straight")["guard"] == summarize(store, "resumed")["guard"]
    assert (layout.search("straight") / "best_sampler.json").read_text().replace("straight", "x") == \
        (layout.search("resumed") / "best_sampler.json").read_text().replace("resumed", "x")


# -- a guard with an inner loop of its own ------------------------------------------------------
def _biased_pair(tables):
    """A search inner loop that prefers step-0.3 by far, and a guard inner loop under which
    step-0.5 is the best and step-0.3 no better than uniform (a short horizon's bias toward an
    aggressive filter, and a longer view that does not share it)."""
    design = initial_design(tables)
    step03, step05 = design[1], design[2]

    def near(z, target):
        return math.exp(-float(np.sum((z - target) ** 2)) / 0.01)

    search = Toy(lambda z: 0.5 + 0.05 * near(z, step03) + 0.03 * near(z, step05), sd=0.002)
    guard = Toy(lambda z: 0.5 + 0.0 * near(z, step03) + 0.03 * near(z, step05), sd=0.002)
    return search, guard, step03, step05


def run_guarded(store, name, search, guard, tables, *, inner_loop="early", steps=8, candidates=2):
    design = tuple(initial_design(tables, "cgf"))
    return run_search(store, name, search, lambda z: Sampler.from_point(z, tables, "cgf"),
                      settings={"transform": "cgf"}, steps=steps, seed=0, initial_points=design,
                      trial_seeds="common", guard_objective=guard,
                      guard=GuardSettings(candidates=candidates, repeats=3, inner_loop=inner_loop))


def test_a_guard_with_its_own_inner_loop_compares_by_it_alone(tmp_path, tables):
    store = make_store(tmp_path / "store")
    search, guard, step03, step05 = _biased_pair(tables)
    summary = run_guarded(store, "own", search, guard, tables)
    trials = read_trials(StoreLayout(store).search("own") / "trials.parquet")
    phases = [t["phase"] for t in trials]
    assert phases.count("guard") == 0 and phases.count("guard-early") == 3 * 3  # uniform + 2
    # Every guard-phase trial ran the guard's objective, every other one the search's.
    assert len(guard.calls) == 9 and len(search.calls) == len(trials) - 9
    early = [t for t in trials if t["phase"] == "guard-early"]
    assert sorted({t["seed"] for t in early}) == [1, 2, 3]
    uniform = initial_design(tables)[0]
    assert sum(np.allclose(t["point"], uniform) for t in early) == 3
    # The search's inner loop alone would pick step-0.3; the guard's picks step-0.5.
    assert search.signal(step03) > search.signal(step05)
    assert summary["choice"] == "guard" and summary["guard"]["phase"] == "guard-early"
    np.testing.assert_allclose(trials[summary["best_trial"]]["point"], step05)
    u = [t["score"] for t in early if np.allclose(t["point"], uniform)]
    assert summary["guard"]["uniform_scores"] == u


def test_a_finished_search_can_be_guarded_again_with_another_inner_loop(tmp_path, tables):
    store = make_store(tmp_path / "store")
    search, guard, step03, step05 = _biased_pair(tables)
    first = run_guarded(store, "again", search, None, tables, inner_loop="search")
    path = StoreLayout(store).search("again") / "trials.parquet"
    before = read_trials(path)
    np.testing.assert_allclose(before[first["best_trial"]]["point"], step03)
    calls = len(search.calls)
    second = run_guarded(store, "again", search, guard, tables, inner_loop="early")
    after = read_trials(path)
    keys = ("trial", "point", "seed", "phase", "score", "status")
    assert [[t[k] for k in keys] for t in after[: len(before)]] == \
        [[t[k] for k in keys] for t in before]  # nothing recorded is touched
    assert [t["phase"] for t in after[len(before):]] == ["guard-early"] * 9
    assert len(search.calls) == calls  # no search trial is run again
    np.testing.assert_allclose(after[second["best_trial"]]["point"], step05)
    best = json.loads((path.parent / "best_sampler.json").read_text())
    assert best["provenance"]["trial"] == second["best_trial"]
    # Back to the search's inner loop: its own guard trials decide again, not the early ones.
    third = run_guarded(store, "again", search, None, tables, inner_loop="search")
    assert third["best_trial"] == first["best_trial"] and len(read_trials(path)) == len(after)
    # What the noise trials depend on may not change.
    with pytest.raises(StoreError, match="guard"):
        run_search(store, "again", search, lambda z: Sampler.from_point(z, tables, "cgf"),
                   settings={"transform": "cgf"}, steps=8, seed=0,
                   initial_points=tuple(initial_design(tables, "cgf")), trial_seeds="common",
                   guard=GuardSettings(candidates=2, repeats=2, inner_loop="search"))


@pytest.mark.parametrize("cut", [12, 16])  # the first and a later guard-early trial
def test_resumed_search_with_its_own_guard_matches_an_uninterrupted_one(tmp_path, tables, cut):
    store = make_store(tmp_path / "store")
    search, guard, *_ = _biased_pair(tables)
    run_guarded(store, "straight", search, guard, tables)
    n_search = sum(t["phase"] != "guard-early"
                   for t in read_trials(StoreLayout(store).search("straight") / "trials.parquet"))
    s2, g2, *_ = _biased_pair(tables)
    g2.cut_at = cut - n_search
    with pytest.raises(KeyboardInterrupt):
        run_guarded(store, "resumed", s2, g2, tables)
    s3, g3, *_ = _biased_pair(tables)
    run_guarded(store, "resumed", s3, g3, tables)
    layout = StoreLayout(store)
    a = read_trials(layout.search("straight") / "trials.parquet")
    b = read_trials(layout.search("resumed") / "trials.parquet")
    keys = ("point", "seed", "phase", "score", "status")
    assert [[t[k] for k in keys] for t in a] == [[t[k] for k in keys] for t in b]
    assert len(s3.calls) == 0 and len(g3.calls) == len(b) - cut
    assert summarize(store, "straight")["guard"] == summarize(store, "resumed")["guard"]


def test_a_guard_with_its_own_inner_loop_needs_its_objective(tmp_path, tables):
    store = make_store(tmp_path / "store")
    with pytest.raises(UsageError, match="guard_objective"):
        run_guarded(store, "none", Toy(lambda z: 0.5), None, tables)
    with pytest.raises(UsageError, match="inner loop"):
        GuardSettings(inner_loop="later").check()


def test_the_initial_shapes_keep_the_clean_end_of_the_first_feature():
    from swift_sampler.pipeline.sampler.pair import FeaturePair
    from swift_sampler.pipeline.sampler.table_build import build_tables

    rng = np.random.default_rng(0)
    n = 400
    x1, x2, g = rng.normal(size=n), rng.normal(size=n), rng.uniform(0.1, 1.0, size=n)
    for first, sign in (("loss_mean", 1.0), ("margin_mean", -1.0), ("entropy_r", -1.0)):
        pair = FeaturePair((first, "loss" if first != "loss" else "entropy_r"))
        tables = build_tables(x1, x2, g, pair=pair, quantiles=32, angles=8)
        shapes = dict(canonical_samplers(tables))
        assert shapes["step-0.5"].c1 == sign and shapes["ramp"].c1 == sign, first
        # the step keeps the clean end: low values of a "high is noisy" feature, else high ones
        tau = shapes["step-0.5"].tau(x1, x2, precise=True)
        kept, dropped = x1[tau > 0.5], x1[tau < 0.5]
        assert (kept.mean() < dropped.mean()) == (sign > 0), first
