"""Tables: knots and transform against the exact computation (sort + cumsum over the rows)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.piecewise import Piecewise
from swift_sampler.pipeline.sampler.table_build import build_tables
from swift_sampler.pipeline.sampler.table_store import build_store_tables, load_tables
from swift_sampler.pipeline.sampler.transform import FeatureTables, TablesError
from swift_sampler.storage import StoreLayout

TOL = 0.01


def exact_cdf(x: np.ndarray) -> np.ndarray:
    """Fraction of rows <= x (equation 7), by sorting."""
    s = np.sort(x)
    return np.searchsorted(s, x, side="right") / x.size


def exact_t(f1, f2, w, c1, c2) -> np.ndarray:
    """Equation 10 at every row: weight of rows with G <= G(x), over the total (c=0 -> 1)."""
    g = c1 * f1 + c2 * f2
    order = np.argsort(g, kind="stable")
    cum = np.cumsum(w[order])
    return cum[np.searchsorted(g[order], g, side="right") - 1] / cum[-1]


def make_features(kind: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    loss = rng.gamma(0.7, 1.0, n)
    er = np.clip(rng.beta(5, 2, n) * 2.3 - 0.5 * np.tanh(loss) + 0.1 * rng.normal(size=n), 0, None)
    if kind == "lognormal":  # heavy tail, growing with the loss (most gradient in few crops)
        w = np.exp(0.5 * loss) * rng.lognormal(0, 0.6, n)
    elif kind == "pareto":
        w = rng.pareto(3.5, n) + 1e-3
    elif kind == "ties":  # a third of the crops at loss 0, E^r rounded to 0.01, integer grads
        loss[rng.random(n) < 0.33] = 0.0
        er = np.round(er, 2)
        w = rng.integers(0, 4, n).astype(float)
    else:
        w = np.abs(rng.normal(size=n)) + 0.1
    return loss.astype(np.float32), er.astype(np.float32), w.astype(np.float32)


# Axis directions exactly, and generic ones (not within a few 1/Q of an axis, where the 1/Q
# error of the feature cdf decides the order of crops with nearly equal G: see the report).
DIRECTIONS = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)] + [
    (math.cos(a), math.sin(a)) for a in (0.05, 1.234, 2.5, 3.9, 5.1, 6.2)]


@pytest.mark.parametrize("dist", ["plain", "lognormal", "pareto", "ties"])
@pytest.mark.parametrize("bins", [512, 96])  # rows themselves (exact points), and a 96x96 grid
def test_transform_matches_exact(dist, bins):
    n = 20_000
    loss, er, w = make_features(dist, n)
    assert (w.max() / w.sum()) < 0.005  # no single crop decides a 0.01 step by itself
    tab = build_tables(loss, er, w, quantiles=1024, angles=24, bins=bins)
    f1, f2 = exact_cdf(loss), exact_cdf(er)
    assert np.abs(tab.feature_cdf("loss", loss) - f1).max() <= 1 / 1024 + 1e-12
    for kind, weight in (("cgf", w.astype(np.float64)), ("cdf", np.ones(n))):
        for u1, u2 in DIRECTIONS:
            for r in (1.0, 0.3):  # T depends on the direction of c only
                c1, c2 = r * u1, r * u2
                got = tab.transform_raw(loss, er, c1, c2, kind)
                want = exact_t(f1, f2, weight, c1, c2)
                err = np.abs(got - want).max()
                assert err <= TOL, (kind, c1, c2, err)
            # The float32 path (H = identity, so tau = T) keeps the same tolerance.
            ident = (0.0, 0.25, 0.5, 0.75, 1.0)
            fast = Sampler(ident, ident, u1, u2, kind, tab).tau(loss, er)
            assert fast.dtype == np.float32
            assert np.abs(fast - exact_t(f1, f2, weight, u1, u2)).max() <= TOL, (kind, u1, u2)


def test_grid_angle_blend_on_smooth_features():
    """Without points (a subset from another direction) the two neighbouring angles are blended."""
    n = 8000
    loss, er, w = make_features("lognormal", n, seed=3)
    full = build_tables(loss, er, w, angles=720)
    bare = FeatureTables(full.quantiles, full.angle_count, full.cdf_knots, full.angles, full.knots, full.rows)
    f1, f2 = exact_cdf(loss), exact_cdf(er)
    for theta in (0.3001, 1.9, 4.44):
        c1, c2 = math.cos(theta), math.sin(theta)
        err = np.abs(bare.transform_raw(loss, er, c1, c2) - exact_t(f1, f2, w.astype(float), c1, c2)).max()
        assert err <= TOL


def test_zero_c_and_constant_feature():
    n = 500
    rng = np.random.default_rng(1)
    loss = np.full(n, 0.25)  # constant: every crop sits at cdf 1
    er = rng.random(n)
    tab = build_tables(loss, er, rng.random(n), quantiles=64, angles=8)
    assert np.all(tab.feature_cdf("loss", loss) == 1.0)
    assert tab.feature_cdf("loss", [0.1])[0] == 0.0
    assert np.all(tab.transform(rng.random(10), rng.random(10), 0.0, 0.0) == 1.0)


def test_subset_gives_the_same_t():
    loss, er, w = make_features("ties", 3000, seed=2)
    tab = build_tables(loss, er, w, angles=36)
    for c1, c2 in ((0.3, -0.7), (1.0, 0.0), (0.0, 0.0)):
        sub = tab.subset(c1, c2, ("cgf",))
        assert sub.points is None and len(sub.angles) <= 1
        np.testing.assert_array_equal(sub.transform_raw(loss, er, c1, c2), tab.transform_raw(loss, er, c1, c2))
    with pytest.raises(TablesError, match="another sampler"):
        tab.subset(0.3, -0.7).transform_raw(loss, er, -0.2, 0.9)


def test_bad_input_is_refused():
    with pytest.raises(TablesError, match="loss"):
        build_tables([np.nan, 1.0], [1.0, 2.0], [1.0, 1.0])
    with pytest.raises(TablesError, match="grad_norm"):
        build_tables([1.0, 2.0], [1.0, 2.0], [0.0, 0.0])
    with pytest.raises(TablesError, match="length"):
        build_tables([1.0, 2.0], [1.0], [1.0, 1.0])


def make_feature_store(root, n=2000, seed=0, store_id="s-1", sha="abc"):
    """A store with a manifest and one features part (what build-features leaves behind)."""
    import pyarrow as pa

    from swift_sampler.storage import atomic_write_json, atomic_write_parquet
    from swift_sampler.storage.schemas import FEATURES

    loss, er, w = make_features("lognormal", n, seed)
    cols = {name: np.zeros(n, dtype=t.to_pandas_dtype()) for name, t in zip(FEATURES.names, FEATURES.types)}
    cols.update(index=np.arange(n), loss=loss, entropy_r=er, grad_norm=w)
    root.mkdir(parents=True, exist_ok=True)
    from swift_sampler.storage.schemas import SAMPLES

    samples = {name: np.zeros(n, dtype=t.to_pandas_dtype()) for name, t in zip(SAMPLES.names, SAMPLES.types)}
    samples.update(split=["train"] * n, index=np.arange(n), key=[f"train-{i:08d}" for i in range(n)],
                   source=[""] * n)
    atomic_write_parquet(root / "samples.parquet", pa.table(samples, schema=SAMPLES))
    from swift_sampler.storage.manifest import FORMAT, VERSION

    atomic_write_json(root / "manifest.json", {"format": FORMAT, "version": VERSION, "store_id": store_id,
                                               "classes": ["a", "b"], "splits": {}, "noise": None, "seed": 0})
    atomic_write_parquet(root / "features" / "part-000000.parquet", pa.table(cols, schema=FEATURES))
    atomic_write_json(StoreLayout(root).features_meta, {"store_id": store_id, "checkpoint_sha256": sha,
                                                            "done": True})
    return loss, er, w


def test_store_tables_round_trip(tmp_path):
    store = tmp_path / "store"
    loss, er, w = make_feature_store(store)
    meta = build_store_tables(store, quantiles=128, angles=16)
    assert meta["rows"] == 2000 and json.loads((store / "tables" / "tables.json").read_text()) == meta
    tab = load_tables(store)
    assert tab == build_tables(loss, er, w, quantiles=128, angles=16)
    from swift_sampler.storage import query

    n = query(store, "SELECT count(*) AS n FROM cgf")["n"][0].as_py()
    assert n == 2 * 16 * 129
    # Features rebuilt from another checkpoint: the old tables are refused.
    info = json.loads(StoreLayout(store).features_meta.read_text())
    StoreLayout(store).features_meta.write_text(json.dumps({**info, "checkpoint_sha256": "other"}))
    with pytest.raises(TablesError, match="rebuild"):
        load_tables(store)


def test_piecewise_matches_interp():
    """Piecewise (exact and float32) and its composition against nested ``np.interp``."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        m = int(rng.integers(2, 30))
        xp = np.sort(np.round(rng.normal(size=m), 1))  # rounding makes repeated knots (jumps)
        fp = np.sort(rng.random(m))
        x = np.concatenate([rng.normal(size=300) * 1.5, xp]).astype(np.float32).astype(np.float64)
        t = Piecewise.from_knots(xp, fp, left=-1.0)
        np.testing.assert_allclose(t(x), np.interp(x, xp, fp, left=-1.0), atol=1e-12)
        e = np.array([0.0, *np.sort(np.round(rng.random(3), 1)), 1.0])  # repeated endpoints too
        v = rng.random(5)
        h = t.then(Piecewise.from_knots(e, v))
        want = np.interp(np.interp(x, xp, fp, left=-1.0), e, v)
        np.testing.assert_allclose(h(x), want, atol=1e-9)
        fast = h.fast(x.astype(np.float32))
        assert fast.dtype == np.float32 and np.abs(fast - want).max() < 1e-5


def test_ties_at_scale_use_the_grid():
    """More rows than grid cells with a third of the crops tied: the tie stays one point."""
    n = 60_000
    loss, er, w = make_features("ties", n, seed=4)
    tab = build_tables(loss, er, w, quantiles=256, angles=8, bins=64)
    assert tab.points["cgf"].shape[1] < n  # grid points, not rows
    f1, f2 = exact_cdf(loss), exact_cdf(er)
    for c1, c2 in ((1.0, 0.0), (0.0, 1.0), (0.6, -0.8)):
        err = np.abs(tab.transform_raw(loss, er, c1, c2) - exact_t(f1, f2, w.astype(float), c1, c2)).max()
        assert err <= TOL, (c1, c2, err)
