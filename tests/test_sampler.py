"""Sampler: tau vs a slow reference of equations 4-10; point and JSON round-trips; bad files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swift_sampler.pipeline.sampler.file import (
    SamplerFileError,
    check_not_all_zero,
    check_provenance,
    load_sampler,
    save_sampler,
)
from swift_sampler.pipeline.sampler.function import UNIFORM, Sampler, SamplerError, uniform_sampler
from swift_sampler.pipeline.sampler.table_build import build_tables
from swift_sampler.storage import StoreError

N = 4000
RNG = np.random.default_rng(7)
LOSS = RNG.gamma(0.7, 1.0, N).astype(np.float32)
ER = (RNG.beta(5, 2, N) * 2.3).astype(np.float32)
GRAD = (np.exp(0.5 * LOSS) * RNG.lognormal(0, 0.5, N)).astype(np.float32)
TABLES = build_tables(LOSS, ER, GRAD, quantiles=1024, angles=24)


def slow_tau(loss, er, grad, e, v, c1, c2, weighted=True):
    """Equations 4-10 row by row: exact cdfs, G, T by sort + cumsum, then H."""
    n = len(loss)
    f1 = np.array([np.sum(loss <= x) / n for x in loss])
    f2 = np.array([np.sum(er <= x) / n for x in er])
    g = c1 * f1 + c2 * f2
    w = grad.astype(np.float64) if weighted else np.ones(n)
    out = np.empty(n)
    for i in range(n):
        t = w[g <= g[i]].sum() / w.sum()
        s = min(np.searchsorted(e, t, side="right") - 1, 3)
        out[i] = v[s] + (t - e[s]) / (e[s + 1] - e[s]) * (v[s + 1] - v[s]) if e[s + 1] > e[s] else v[s + 1]
    return out


unit = st.floats(0.0, 1.0, allow_nan=False)
points = st.lists(unit, min_size=10, max_size=10)


@settings(max_examples=15, deadline=None)
@given(points, st.sampled_from(["cgf", "cdf"]))
def test_tau_matches_slow_reference(z, kind):
    s = Sampler.from_point(z, TABLES, kind)
    idx = np.arange(0, N, 7)
    ref = slow_tau(LOSS, ER, GRAD, np.array(s.endpoints), s.values, s.c1, s.c2, kind == "cgf")[idx]
    got = s.tau(LOSS, ER)[idx]
    # H is Lipschitz with slope max|dv|/de: the t tolerance 0.01 maps through it.
    de = np.diff(s.endpoints)
    slope = max([abs(b - a) / d for a, b, d in zip(s.values, s.values[1:], de) if d > 1e-3] + [0])
    jumps = [d <= 1e-3 for d in de]
    # tau comes back as float32: 1e-6 covers its rounding where H is flat (slope 0).
    close = np.abs(got - ref) <= 0.01 * slope + 1e-6
    if any(jumps):  # near a jump of H a 0.01 error in t may land on the other side
        assert close.mean() > 0.97
    else:
        assert close.all()


@settings(max_examples=30, deadline=None)
@given(points)
def test_point_round_trip(z):
    s = Sampler.from_point(z, TABLES, "cgf")
    z2 = s.to_point()
    zs = np.array(z)
    zs[0:3] = np.sort(zs[0:3])
    np.testing.assert_allclose(z2, zs, atol=1e-12)
    s2 = Sampler.from_point(z2, TABLES, "cgf")
    np.testing.assert_allclose(list(s2.parameters().values()), list(s.parameters().values()), atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(points, st.sampled_from(["cgf", "cdf"]))
def test_json_round_trip_is_exact(tmp_path_factory, z, kind):
    s = Sampler.from_point(z, TABLES, kind)
    if max(s.values) == 0:
        return
    path = tmp_path_factory.mktemp("s") / "best_sampler.json"
    prov = {"store_id": "x", "features_checkpoint_sha256": "y", "search": "s", "trial": 3, "score": 0.5}
    save_sampler(path, s, prov)
    s2, prov2 = load_sampler(path)
    assert s2.parameters() == s.parameters() and s2.transform == s.transform
    assert s2.tables == s.embedded().tables
    assert prov2 == prov
    np.testing.assert_array_equal(s2.tau(LOSS, ER), s.tau(LOSS, ER))


def test_torch_matches_numpy():
    s = Sampler((0, 0.2, 0.2, 0.7, 1), (0.1, 0.9, 0.3, 1.0, 0.0), 0.6, -0.8, "cgf", TABLES)
    got = s.tau_torch(torch.from_numpy(LOSS), torch.from_numpy(ER)).numpy()
    np.testing.assert_allclose(got, s.tau(LOSS, ER, precise=True), atol=1e-12)
    assert np.all(UNIFORM.tau(LOSS, ER) == 1.0)
    assert np.all(uniform_sampler(TABLES).tau_torch(torch.from_numpy(LOSS), torch.from_numpy(ER)).numpy() == 1)


@pytest.mark.parametrize("kwargs, field", [
    (dict(endpoints=(0, 0.5, 0.4, 0.8, 1)), "e2"),
    (dict(endpoints=(0, 0.5, 0.6, 1.2, 1)), "e3"),
    (dict(values=(0, 1.5, 0, 0, 0)), "v1"),
    (dict(values=(0, 1, 0, 0)), "values"),
    (dict(c1=2.0), "c1"),
    (dict(transform="rank"), "transform"),
    (dict(tables=None), "tables"),
])
def test_invalid_sampler_names_the_field(kwargs, field):
    base = dict(endpoints=(0, 0.2, 0.5, 0.8, 1), values=(1, 1, 1, 1, 1), c1=0.5, c2=0.5,
                transform="cgf", tables=TABLES)
    with pytest.raises(SamplerError, match=field):
        Sampler(**{**base, **kwargs})


GOOD = Sampler((0, 0.2, 0.5, 0.8, 1), (0.2, 1, 0.5, 0.1, 0), 0.9, -0.3, "cgf", TABLES)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["parameters"].update(e2=0.9), "e2"),
    (lambda d: d["parameters"].update(v3=-0.1), "v3"),
    (lambda d: d["parameters"].pop("v4"), "v4"),
    (lambda d: d["parameters"].update(v5=0.3), "v5"),
    (lambda d: d["parameters"].update(c2="x"), "c2"),
    (lambda d: d.update(transform="rank"), "transform"),
    (lambda d: d.update(tables=None), "tables"),
    (lambda d: d["tables"].pop("cdf"), "tables.cdf"),
    (lambda d: d["tables"]["knots"][0].pop(), "tables.knots"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["parameters"].update(v0=0, v1=0, v2=0, v3=0, v4=0), "values"),
])
def test_bad_sampler_file_names_the_field(tmp_path, edit, field):
    path = tmp_path / "s.json"
    save_sampler(path, GOOD, {"store_id": "a"})
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(SamplerFileError, match=field):
        load_sampler(path)


def test_not_json_and_nan_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{'format': 1}")
    with pytest.raises(SamplerFileError, match="JSON"):
        load_sampler(path)
    save_sampler(path, GOOD, {})
    path.write_text(path.read_text().replace('"c1": 0.9', '"c1": NaN'))
    with pytest.raises(SamplerFileError):
        load_sampler(path)


def test_all_zero_tau_refused():
    # Values non-zero only at t = e0 = 0, which no crop reaches when the first segment is 0 wide.
    s = Sampler((0, 0, 0.5, 0.8, 1), (1, 0, 0, 0, 0), 1.0, 0.0, "cdf", TABLES)
    with pytest.raises(SamplerFileError, match="tau is 0"):
        check_not_all_zero(s)
    check_not_all_zero(GOOD)


def test_provenance(tmp_path):
    from test_tables import make_feature_store

    store = tmp_path / "store"
    make_feature_store(store, n=300, store_id="S", sha="C")
    check_provenance({"store_id": "S", "features_checkpoint_sha256": "C"}, store)
    with pytest.raises(SamplerFileError, match="store_id"):
        check_provenance({"store_id": "T", "features_checkpoint_sha256": "C"}, store)
    with pytest.raises(SamplerFileError, match="checkpoint"):
        check_provenance({"store_id": "S", "features_checkpoint_sha256": "D"}, store)
    check_provenance({"store_id": "T"}, store, allow_foreign=True)
    assert math.isfinite(GOOD.tau(LOSS, ER).sum())


def test_plot_sampler_writes_two_pngs(tmp_path):
    """plot sampler: two valid PNGs beside the sampler file (or in --out-dir), same bytes twice."""
    from PIL import Image
    from test_tables import make_feature_store

    from swift_sampler.figures.sampler import plot_sampler

    store = tmp_path / "store"
    loss, er, w = make_feature_store(store, n=3000, store_id="S", sha="C")
    tab = build_tables(loss, er, w, quantiles=128, angles=16)
    s = Sampler((0, 0.2, 0.5, 0.8, 1), (0.2, 1, 0.5, 0.1, 0), 0.9, -0.3, "cgf", tab)
    path = save_sampler(tmp_path / "runs" / "best_sampler.json", s, {"store_id": "S"})
    paths = plot_sampler(path, store)
    assert [p.parent for p in paths] == [path.parent] * 2 and len(set(paths)) == 2
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            im.verify()
    assert not list(path.parent.glob(".tmp-*"))
    other = plot_sampler(path, store, out_dir=tmp_path / "figs")
    assert [p.read_bytes() for p in other] == [p.read_bytes() for p in paths]  # same input, same PNG
    empty = tmp_path / "empty"
    make_feature_store(empty, n=10)
    for part in (empty / "features").glob("part-*.parquet"):
        part.unlink()
    with pytest.raises(StoreError, match="no features"):
        plot_sampler(path, empty)
