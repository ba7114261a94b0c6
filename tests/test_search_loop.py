"""The resumable search loop with cheap fake objectives (no training): resume after a crash,
settings checks, failed trials, the lock, the torchrun rank protocol, the trials view."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from swift_sampler.pipeline.sampler.file import load_sampler
from swift_sampler.pipeline.sampler.function import Sampler, uniform_sampler
from swift_sampler.search.loop import (
    GuardSettings,
    TrialResult,
    best_so_far,
    read_trials,
    run_search,
    summarize,
)
from swift_sampler.storage import LockedError, StoreError, StoreLayout, exclusive_lock, query

TARGET = np.linspace(0.2, 0.8, 10)


def make_store(path):
    """A bare store: run_search needs only the manifest to exist."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"store_id": "test-store"}))
    return path


class FakeObjective:
    """A smooth score of the sampler's point plus seed-dependent noise; records every call."""

    def __init__(self, fail_at: int | None = None, nan_at: tuple[int, ...] = ()):
        self.calls: list[tuple[np.ndarray, int]] = []
        self.fail_at, self.nan_at = fail_at, nan_at

    def __call__(self, sampler: Sampler, seed: int) -> TrialResult:
        self.calls.append((sampler.to_point(), seed))
        if self.fail_at is not None and len(self.calls) - 1 == self.fail_at:
            raise KeyboardInterrupt("cut off mid-trial")
        z = sampler.to_point()
        noise = np.random.default_rng(seed).normal(0, 0.01)
        score = math.nan if seed in self.nan_at else float(1 - np.sum((z - TARGET) ** 2) / 10 + noise)
        return TrialResult(score=score, epochs=1, kept_fraction=0.5, flipped_kept_share=0.3)


# The loop's mechanics are tested without the noise trials and the guard (tests/test_choice.py).
NO_GUARD = GuardSettings(enabled=False, repeats=0)


def search(store, name, objective, tables, *, steps=6, settings=None, agent="gp-ucb", seed=3,
           trial_seeds="distinct", guard=NO_GUARD, **kw):
    start = uniform_sampler(tables, "cgf").to_point()
    return run_search(store, name, objective, lambda z: Sampler.from_point(z, tables, "cgf"),
                      settings=settings or {"transform": "cgf", "epochs": 1}, steps=steps,
                      agent=agent, seed=seed, initial_points=(start,), trial_seeds=trial_seeds,
                      guard=guard, provenance={"store_id": "test-store"}, **kw)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("steps, cut", [(6, 3), (8, 7)])  # (8, 7): cut during a GP proposal
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tables, steps, cut):
    store = make_store(tmp_path / "store")
    search(store, "straight", FakeObjective(), tables, steps=steps)
    broken = FakeObjective(fail_at=cut)
    with pytest.raises(KeyboardInterrupt):
        search(store, "resumed", broken, tables, steps=steps)
    folder = StoreLayout(store).search("resumed")
    assert [r["trial"] for r in read_trials(folder / "trials.parquet")] == list(range(cut))  # no half trial
    again = FakeObjective()
    summary = search(store, "resumed", again, tables, steps=steps)
    # The cut trial is re-run, nothing is repeated, and it is the same proposal as before.
    assert [seed for _, seed in again.calls] == [3 + n for n in range(cut, steps)]
    np.testing.assert_array_equal(again.calls[0][0], broken.calls[cut][0])
    straight = read_trials(StoreLayout(store).search("straight") / "trials.parquet")
    resumed = read_trials(folder / "trials.parquet")
    assert without_time(resumed) == without_time(straight)
    assert summary["trials"] == steps
    # The first proposal is the uniform sampler's point.
    np.testing.assert_allclose(resumed[0]["point"], uniform_sampler(tables).to_point())
    best_a, prov_a = load_sampler(StoreLayout(store).search("straight") / "best_sampler.json")
    best_b, prov_b = load_sampler(folder / "best_sampler.json")
    assert best_a.parameters() == best_b.parameters()
    assert prov_a["trial"] == prov_b["trial"] == summary["best_trial"]
    assert prov_b["score"] == max(r["score"] for r in resumed) and prov_b["search"] == "resumed"


def test_finished_search_runs_nothing_and_steps_may_grow(tmp_path, tables):
    store = make_store(tmp_path / "store")
    search(store, "s", FakeObjective(), tables, steps=3, agent="random")
    idle = FakeObjective()
    assert search(store, "s", idle, tables, steps=3, agent="random")["trials"] == 3
    assert idle.calls == []
    more = FakeObjective()
    assert search(store, "s", more, tables, steps=5, agent="random")["trials"] == 5
    assert [seed for _, seed in more.calls] == [6, 7]
    long = FakeObjective()
    search(store, "long", long, tables, steps=5, agent="random")
    assert without_time(read_trials(StoreLayout(store).search("s") / "trials.parquet")) == \
        without_time(read_trials(StoreLayout(store).search("long") / "trials.parquet"))


def test_other_settings_are_refused_naming_them(tmp_path, tables):
    store = make_store(tmp_path / "store")
    search(store, "s", FakeObjective(), tables, steps=2, agent="random")
    with pytest.raises(StoreError, match=r"epochs: stored 1, now 2.*seed: stored 3, now 4"):
        search(store, "s", FakeObjective(), tables, steps=3, agent="random", seed=4,
               settings={"transform": "cgf", "epochs": 2})
    with pytest.raises(StoreError, match="agent: stored 'random', now 'gp-ucb'"):
        search(store, "s", FakeObjective(), tables, steps=3, agent="gp-ucb")
    # A nested setting is named by the entry that differs, not printed whole.
    search(store, "nested", FakeObjective(), tables, steps=2, agent="random",
           settings={"finetune": {"features": "store", "lr": 0.1}})
    with pytest.raises(StoreError, match=r"\(finetune.features: stored 'store', now 'image'\); rerun"):
        search(store, "nested", FakeObjective(), tables, steps=3, agent="random",
               settings={"finetune": {"features": "image", "lr": 0.1}})
    assert len(read_trials(StoreLayout(store).search("s") / "trials.parquet")) == 2


def test_workers_and_ranks_are_checked_on_resume_unless_never_recorded(tmp_path, tables):
    store = make_store(tmp_path / "store")
    recorded = {"transform": "cgf", "epochs": 1, "workers": 1, "world_size": 1}
    search(store, "s", FakeObjective(), tables, steps=2, agent="random", settings=recorded)
    for key in ("workers", "world_size"):
        with pytest.raises(StoreError, match=f"{key}: stored 1, now 2"):
            search(store, "s", FakeObjective(), tables, steps=3, agent="random",
                   settings={**recorded, key: 2})
    # search.json of a search made before they were recorded: not checked, and recorded now.
    path = StoreLayout(store).search("s") / "search.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("workers", "world_size")}
    path.write_text(json.dumps(old))
    more = FakeObjective()
    search(store, "s", more, tables, steps=3, agent="random", settings={**recorded, "workers": 2})
    assert [seed for _, seed in more.calls] == [5]
    assert json.loads(path.read_text())["workers"] == 2


def test_failed_trial_gets_the_worst_score_and_the_search_goes_on(tmp_path, tables):
    store = make_store(tmp_path / "store")
    seed = 3
    objective = FakeObjective(nan_at=(seed + 2, seed + 4))
    summary = search(store, "s", objective, tables, steps=6, seed=seed)
    rows = read_trials(StoreLayout(store).search("s") / "trials.parquet")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "failed", "ok"]
    assert rows[2]["score"] == min(rows[0]["score"], rows[1]["score"])
    assert rows[4]["score"] == min(r["score"] for r in rows[:4] if r["status"] == "ok")
    assert summary["failed"] == 2 and summary["trials"] == 6
    assert rows[summary["best_trial"]]["status"] == "ok"
    curve = best_so_far(rows)
    assert np.all(np.diff(curve) >= 0)
    assert curve[-1] == max(r["score"] for r in rows if r["status"] == "ok")


def test_first_trial_failing_is_recorded_with_zero(tmp_path, tables):
    store = make_store(tmp_path / "store")
    summary = search(store, "s", FakeObjective(nan_at=(3,)), tables, steps=2, agent="random")
    rows = read_trials(StoreLayout(store).search("s") / "trials.parquet")
    assert rows[0]["status"] == "failed" and rows[0]["score"] == 0.0
    assert summary["best_trial"] == 1


def test_second_search_on_the_same_name_is_locked_out(tmp_path, tables):
    store = make_store(tmp_path / "store")
    with exclusive_lock(StoreLayout(store).search("s") / ".lock", "search 's'"):
        with pytest.raises(LockedError, match="search 's' is in use"):
            search(store, "s", FakeObjective(), tables, steps=1)
    search(store, "s", FakeObjective(), tables, steps=1)  # free again


def test_other_ranks_follow_rank_0_and_write_nothing(tmp_path, tables):
    """The torchrun protocol without processes: rank 0's broadcasts are replayed to rank 1."""
    store = make_store(tmp_path / "store")
    sent = []

    def send(obj):
        sent.append(obj)
        return obj

    main = FakeObjective()
    search(store, "s", main, tables, steps=4, broadcast=send)
    follower = FakeObjective()
    replay = iter(sent)
    other = make_store(tmp_path / "other")
    search(other, "s", follower, tables, steps=4, is_main=False, broadcast=lambda _: next(replay))
    assert [s for _, s in follower.calls] == [s for _, s in main.calls]
    for (a, _), (b, _) in zip(follower.calls, main.calls):
        np.testing.assert_array_equal(a, b)
    assert not StoreLayout(other).search("s").exists()
    # A rank-0 failure (e.g. settings mismatch) reaches every rank instead of hanging it.
    with pytest.raises(StoreError, match="rank 0 failed: boom"):
        search(other, "s", FakeObjective(), tables, steps=4, is_main=False,
               broadcast=lambda _: ("error", "boom"))


def test_trials_view_and_summary(tmp_path, tables):
    store = make_store(tmp_path / "store")
    search(store, "a", FakeObjective(), tables, steps=3, agent="random")
    search(store, "b", FakeObjective(), tables, steps=2, agent="random")
    table = query(store, "SELECT search, count(*) AS n, max(score) AS best FROM trials "
                         "GROUP BY search ORDER BY search")
    assert table["search"].to_pylist() == ["a", "b"] and table["n"].to_pylist() == [3, 2]
    for name in ("a", "b"):
        rows = read_trials(StoreLayout(store).search(name) / "trials.parquet")
        assert summarize(store, name)["best_score"] == max(r["score"] for r in rows)
    with pytest.raises(StoreError, match="no finished trials"):
        summarize(store, "missing")


def test_damaged_trials_file_is_refused(tmp_path, tables):
    import pyarrow as pa

    from swift_sampler.storage import atomic_write_parquet
    from swift_sampler.storage.schemas import TRIALS

    store = make_store(tmp_path / "store")
    search(store, "s", FakeObjective(), tables, steps=3, agent="random")
    path = StoreLayout(store).search("s") / "trials.parquet"
    rows = read_trials(path)
    atomic_write_parquet(path, pa.Table.from_pylist([rows[0], rows[2]], schema=TRIALS))
    with pytest.raises(StoreError, match="does not hold trials"):
        search(store, "s", FakeObjective(), tables, steps=4, agent="random")


def _damage(folder, what):
    """Damage one file of a search folder as a full disk, a bad copy or an editor would;
    returns the file's name."""
    if what == "trials-empty":
        (folder / "trials.parquet").write_bytes(b"")
    elif what == "trials-cut":
        data = (folder / "trials.parquet").read_bytes()
        (folder / "trials.parquet").write_bytes(data[: len(data) // 2])
    else:
        (folder / what).write_text('{"seed": 3, "agent": ')
    return "trials.parquet" if what.startswith("trials") else what


@pytest.mark.parametrize("what", ["trials-empty", "trials-cut", "search.json", "confirm.json"])
def test_damaged_search_file_is_named_by_run_show_and_plot(tmp_path, tables, capsys, what):
    from swift_sampler.cli import main

    store = make_store(tmp_path / "store")
    search(store, "s", FakeObjective(), tables, steps=3, agent="random")
    search(store, "other", FakeObjective(), tables, steps=2, agent="random")
    name = _damage(StoreLayout(store).search("s"), what)
    with pytest.raises(StoreError, match=f"{name}.*(restore|delete|move)") as e:
        search(store, "s", FakeObjective(), tables, steps=4, agent="random")
    assert str(StoreLayout(store).search("s") / name) in str(e.value)
    readers = [["search", "show", "--store", store, "s"]]
    if what != "confirm.json":  # the figure does not use the full-run check's verdict
        readers.append(["plot", "search", "--store", store, "s"])
    for argv in readers:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and name in err and "Traceback" not in err, err
        assert any(fix in err for fix in ("restore", "delete")), err
    if not what.startswith("trials"):  # (a damaged trials file breaks the store's trials view)
        assert main(["search", "show", "--store", str(store), "other", "--json"]) == 0


def test_plot_search_draws_every_search(tmp_path, tables):
    from PIL import Image

    from swift_sampler.figures.search import plot_search

    store = make_store(tmp_path / "store")
    search(store, "gp", FakeObjective(nan_at=(4,)), tables, steps=3, agent="gp-ucb")
    search(store, "rnd", FakeObjective(), tables, steps=4, agent="random")
    out = plot_search(store, ["gp", "rnd"])
    assert out == StoreLayout(store).root / "figures" / "search.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(StoreError, match="searches with trials: gp, rnd"):
        plot_search(store, ["gp", "nope"])


def test_common_trial_seeds_give_every_trial_the_search_seed(tmp_path, tables):
    store = make_store(tmp_path / "store")
    objective = FakeObjective()
    search(store, "c", objective, tables, steps=3, agent="random", seed=7, trial_seeds="common")
    assert [s for _, s in objective.calls] == [7, 7, 7]
    assert [r["seed"] for r in read_trials(StoreLayout(store).search("c") / "trials.parquet")] == [7] * 3
    with pytest.raises(StoreError, match="trial_seeds: stored 'common', now 'distinct'"):
        search(store, "c", objective, tables, steps=4, agent="random", seed=7, trial_seeds="distinct")
