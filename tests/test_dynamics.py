"""Training dynamics: the recorded statistics against a slow per-epoch reference, resume, best
checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_loader import make_store
from test_trainer import one_thread, tiny_config  # noqa: F401 - one_thread is an autouse fixture

from swift_sampler.storage import StoreLayout
from swift_sampler.storage.errors import UsageError
from swift_sampler.train import dynamics as dyn
from swift_sampler.train.checkpoint import load_checkpoint
from swift_sampler.train.distributed import DistInfo
from swift_sampler.train.evaluate import evaluate
from swift_sampler.train.trainer import fit, train


@pytest.fixture
def small(tmp_path):
    return make_store(tmp_path / "small", splits={"train": 48, "val": 16}, classes=4,
                      shard_size=16, noise=0.25)


def single() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def reference(views: list[list[tuple[int, np.ndarray, int]]], n: int) -> dict[str, list]:
    """The statistics by their definitions, one image and one epoch at a time.

    ``views[e]``: (index, logits, label) of every view trained on in epoch ``e``.
    """
    out = {c: [] for c in dyn.COLUMNS}
    for i in range(n):
        per_epoch = []  # (epoch, loss, margin, prob, wrong) averaged over the epoch's views
        for e, epoch_views in enumerate(views):
            mine = [(z, y) for j, z, y in epoch_views if j == i]
            if not mine:
                continue
            loss = margin = prob = wrong = 0.0
            for z, y in mine:
                z = z.astype(np.float64)
                logp = z - (z.max() + math.log(np.exp(z - z.max()).sum()))
                loss += -logp[y]
                margin += z[y] - max(v for c, v in enumerate(z) if c != y)
                prob += math.exp(logp[y])
                wrong += float(int(np.argmax(z)) != y)
            k = len(mine)
            per_epoch.append((e, loss / k, margin / k, prob / k, wrong / k > 0.5))
        out["epochs_seen"].append(len(per_epoch))
        if not per_epoch:
            for c in dyn.COLUMNS[1:]:
                out[c].append(None)
            continue
        losses = [p[1] for p in per_epoch]
        ema = losses[0]
        for x in losses[1:]:
            ema = dyn.EMA_DECAY * ema + (1 - dyn.EMA_DECAY) * x
        probs = [p[3] for p in per_epoch]
        wrong_epochs = [p[0] for p in per_epoch if p[4]]
        out["loss_mean"].append(sum(losses) / len(losses))
        out["loss_ema"].append(ema)
        out["margin_mean"].append(sum(p[2] for p in per_epoch) / len(per_epoch))
        out["prob_mean"].append(sum(probs) / len(probs))
        out["prob_std"].append(float(np.std(probs)))
        out["disagree_epochs"].append(len(wrong_epochs))
        out["learned_epoch"].append(wrong_epochs[-1] + 1 if wrong_epochs else 0)
    return out


def assert_table_matches(table, expected: dict[str, list]) -> None:
    for c in dyn.COLUMNS:
        got = table.column(c).to_pylist()
        for i, (a, b) in enumerate(zip(got, expected[c])):
            if b is None:
                assert a is None, (c, i)
            else:
                assert a == pytest.approx(b, rel=1e-9, abs=1e-9), (c, i)


def test_statistics_of_hand_made_views_match_their_definitions():
    rng = np.random.default_rng(0)
    n, c = 5, 3
    views = []
    d = dyn.TrainingDynamics(n)
    for e in range(4):
        # image 4 is never seen; image 0 twice in epoch 1 (a sampler stage keeps both crops)
        idx = [0, 1, 2, 3] + ([0] if e == 1 else [])
        if e == 2:
            idx = [0, 1, 3]  # image 2 unseen in epoch 2
        z = rng.normal(size=(len(idx), c)) * 3
        y = rng.integers(0, c, size=len(idx))
        d.observe(torch.tensor(idx), torch.tensor(z, dtype=torch.float32), torch.tensor(y))
        d.end_epoch(e, single())
        views.append([(i, zz.astype(np.float32), int(yy)) for i, zz, yy in zip(idx, z, y)])
    table = d.table()
    assert table.column("index").to_pylist() == list(range(n))
    assert_table_matches(table, reference(views, n))
    assert table.column("epochs_seen").to_pylist() == [4, 4, 3, 4, 0]


def test_a_run_records_what_its_training_steps_saw(small, monkeypatch):
    """The trainer feeds every step's logits and given labels; the table follows from them."""
    views: list[list] = [[]]
    observe = dyn.TrainingDynamics.observe

    def spy(self, index, logits, labels):
        for i, z, y in zip(index.tolist(), logits.detach().float().numpy(), labels.tolist()):
            views[-1].append((i, z.copy(), y))
        observe(self, index, logits, labels)

    monkeypatch.setattr(dyn.TrainingDynamics, "observe", spy)
    train(tiny_config(small, name="rec"), on_epoch_end=lambda m: views.append([]))
    views.pop()
    assert len(views) == 3 and all(len(v) == 48 for v in views)
    table = pq.read_table(StoreLayout(small).run("rec") / "dynamics.parquet")
    assert_table_matches(table, reference(views, 48))
    assert set(table.column_names) == {"index", *dyn.COLUMNS}


def test_a_resumed_run_gives_the_table_of_an_uninterrupted_one(small):
    train(tiny_config(small, name="full", workers=2))

    class Stop(Exception):
        pass

    def stop_after_two(metrics):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_config(small, name="cut", workers=2), on_epoch_end=stop_after_two)
    cut = pq.read_table(StoreLayout(small).run("cut") / "dynamics.parquet")
    assert max(cut.column("epochs_seen").to_pylist()) == 2
    train(tiny_config(small, name="cut", workers=2, resume=True))
    a = pq.read_table(StoreLayout(small).run("full") / "dynamics.parquet")
    b = pq.read_table(StoreLayout(small).run("cut") / "dynamics.parquet")
    assert a.equals(b)


def test_unnamed_runs_record_nothing_and_the_switch_turns_it_off(small):
    fit(tiny_config(small, epochs=1))  # a search trial: no run folder
    assert not StoreLayout(small).runs_dir.exists()
    train(tiny_config(small, name="off", epochs=1, record_dynamics=False))
    run = StoreLayout(small).run("off")
    assert not (run / "dynamics.parquet").exists()
    assert "dynamics" not in load_checkpoint(run / "checkpoint.pt")


def test_best_checkpoint_is_the_best_val_epoch(small):
    copies = {}
    run = StoreLayout(small).run("best")

    def keep(metrics):
        copies[metrics["epoch"]] = load_checkpoint(run / "checkpoint.pt")["model"]

    summary = train(tiny_config(small, name="best", epochs=4, lr=0.2), on_epoch_end=keep)
    val = [json.loads(x)["val_accuracy"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = int(np.argmax(val))  # the first of equal epochs
    assert summary["best_epoch"] == best and summary["best_val_accuracy"] == val[best]
    kept = load_checkpoint(summary["best_checkpoint"])
    assert kept["epoch"] == best
    for k, v in kept["model"].items():
        assert torch.equal(v, copies[best][k]), k


def test_diagnostic_split_is_scored_each_epoch(tmp_path):
    store = make_store(tmp_path / "s", splits={"train": 48, "val": 16, "test": 24}, classes=4,
                       shard_size=16)
    train(tiny_config(store, name="diag", epochs=2, diagnostic_split="test"))
    run = StoreLayout(store).run("diag")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("test_accuracy" in r and "val_accuracy" in r for r in rows)
    final = evaluate(store, run / "checkpoint.pt", "test", workers=0)
    assert rows[-1]["test_accuracy"] == pytest.approx(final["top1"])
    with pytest.raises(UsageError, match="diagnostic"):
        tiny_config(store, diagnostic_split="val")


def test_build_features_brings_the_checkpoints_dynamics_into_the_store(small):
    import swift_sampler as ss

    summary = train(tiny_config(small, name="w", epochs=2))
    built = ss.build_features(small, summary["checkpoint"], crops_per_image=2, progress=False,
                              workers=0)
    assert built["dynamics_epochs"] == 2
    stored = ss.sql(small, 'SELECT * FROM dynamics ORDER BY "index"')
    run = pq.read_table(StoreLayout(small).run("w") / "dynamics.parquet")
    assert stored.select(run.column_names).equals(run.replace_schema_metadata(None))
    # every crop row of the features view carries its image's dynamics
    joined = ss.sql(small, 'SELECT f."index", f.loss_mean, d.loss_mean AS d FROM features f '
                           'JOIN dynamics d USING ("index")')
    assert joined.num_rows == 2 * 48
    assert joined.column("loss_mean").to_pylist() == joined.column("d").to_pylist()
    # a checkpoint without dynamics leaves none behind
    other = train(tiny_config(small, name="plain", epochs=1, record_dynamics=False))
    ss.build_features(small, other["checkpoint"], crops_per_image=2, progress=False, workers=0,
                      overwrite=True)
    assert not StoreLayout(small).dynamics.exists()
    assert "loss_mean" not in ss.sql(small, "SELECT * FROM features LIMIT 1").column_names
    # the command line does the same
    from swift_sampler.cli import main

    assert main(["pipeline", "build-features", "--store", str(small), "--checkpoint",
                 summary["checkpoint"], "--crops-per-image", "2", "--overwrite", "--json"]) == 0
    assert StoreLayout(small).dynamics.is_file()
