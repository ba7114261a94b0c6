"""The trainer: learns digits, resumes exactly, stops on NaN, evaluates, CLI round trip."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_loader import make_store

from swift_sampler.cli import main
from swift_sampler.storage import StoreError, StoreLayout
from swift_sampler.train.checkpoint import CheckpointError, load_checkpoint, load_model
from swift_sampler.train.evaluate import evaluate, predict
from swift_sampler.train.models import UnknownModelError
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.trainer import TrainingDiverged, fit, train


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: one intra-op thread per process avoids oversubscription stalls.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    pix = (d.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pix))
    tr, va = order[:1400], order[1400:]
    root = tmp_path_factory.mktemp("digits") / "store"
    return make_store(root, splits={"train": len(tr), "val": len(va)}, channels=1, classes=10,
                      shard_size=350, images={"train": pix[tr], "val": pix[va]},
                      labels={"train": d.target[tr], "val": d.target[va]})


@pytest.fixture
def small(tmp_path):
    return make_store(tmp_path / "small", splits={"train": 64, "val": 16}, classes=4,
                      shard_size=16, noise=0.25)


def tiny_config(store, **kw):
    base = dict(model="digits-net", epochs=3, batch_size=8, lr=0.05, schedule="cosine",
                workers=0, progress=False, shuffle_buffer=16)
    return resolve_config(store, **{**base, **kw})


def test_digits_reach_90_percent(digits):
    summary = train(resolve_config(digits, preset="digits", workers=0, progress=False))
    assert summary["val_accuracy"] > 0.90


def test_resume_after_interruption_gives_the_same_weights(small):
    full = fit(tiny_config(small, name="full", workers=2)).model

    class Stop(Exception):
        pass

    def stop_after_two(metrics):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_config(small, name="cut", workers=2), on_epoch_end=stop_after_two)
    assert load_checkpoint(StoreLayout(small).run("cut") / "checkpoint.pt")["epoch"] == 1
    resumed = fit(tiny_config(small, name="cut", workers=2, resume=True))
    assert resumed.summary["start_epoch"] == 2
    for (k, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    lines = (StoreLayout(small).run("cut") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]


def test_run_folder_contents_and_existing_run(small):
    train(tiny_config(small, name="r", epochs=1))
    run = StoreLayout(small).run("r")
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "digits-net" and config["steps_per_epoch"] == 8
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert {"epoch", "loss", "accuracy", "lr", "images_per_s", "val_accuracy"} <= set(metrics)
    assert json.loads((run / "summary.json").read_text())["run"] == "r"
    with pytest.raises(StoreError, match=r"already exists.*resume=True from Python"):
        train(tiny_config(small, name="r", epochs=1))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small):
    # lr x 1e30 from epoch 1 on: the loss blows up in epoch 1, epoch 0 was fine.
    config = tiny_config(small, name="nan", schedule="multistep", milestones=(1,), gamma=1e30)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(config)
    path = StoreLayout(small).run("nan") / "checkpoint.pt"
    model, meta = load_model(path)
    assert meta["epoch"] == 0
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_init_checks_classes_and_model(small, tmp_path):
    train(tiny_config(small, name="base", epochs=1))
    ckpt = StoreLayout(small).run("base") / "checkpoint.pt"
    summary = train(tiny_config(small, epochs=1, init=str(ckpt)))
    assert summary["epochs"] == 1
    other = make_store(tmp_path / "other", splits={"train": 32, "val": 8}, classes=6)
    with pytest.raises(CheckpointError, match="4 classes"):
        train(tiny_config(other, epochs=1, init=str(ckpt)))
    with pytest.raises(CheckpointError, match="holds a 'digits-net' model"):
        train(tiny_config(small, epochs=1, init=str(ckpt), model="resnet18"))
    with pytest.raises(UnknownModelError):
        train(tiny_config(small, epochs=1, model="no-such-net"))


def test_evaluate_reports_noise_diagnostics(small):
    model = fit(tiny_config(small, epochs=1)).model
    result = evaluate(small, model, "train", workers=0)
    out = predict(small, model, "train", workers=0)
    assert out["index"].tolist() == list(range(64))
    pred = out["logits"].argmax(1)
    rows = pq.read_table(StoreLayout(small).samples).to_pylist()
    truth = {r["index"]: r for r in rows if r["split"] == "train"}
    flipped = np.array([truth[i]["noisy"] for i in range(64)])
    true = np.array([truth[i]["true_label"] for i in range(64)])
    assert result["top1"] == pytest.approx(np.mean(pred == out["label"]))
    assert result["noise"]["n_flipped"] == flipped.sum() > 0
    assert result["noise"]["clean_accuracy"] == pytest.approx(
        np.mean(pred[~flipped] == true[~flipped]))
    assert result["noise"]["flipped_true_accuracy"] == pytest.approx(
        np.mean(pred[flipped] == true[flipped]))
    assert "noise" not in evaluate(small, model, "val", workers=0)


def test_cli_train_evaluate_and_bad_input(small, tmp_path, capsys):
    rc = main(["train", "--store", str(small), "--name", "cli", "--model", "digits-net",
               "--epochs", "1", "--batch-size", "8", "--workers", "0", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and json.loads(out[-1])["run"] == "cli"
    ckpt = StoreLayout(small).run("cli") / "checkpoint.pt"
    rc = main(["evaluate", "--store", str(small), "--checkpoint", str(ckpt), "--split", "val",
               "--workers", "0", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["count"] == 16 and "top5" not in result
    rc = main(["train", "--store", str(small), "--name", "x", "--model", "nope", "--json"])
    assert rc == 2 and "unknown model" in capsys.readouterr().err
    empty = make_store(tmp_path / "empty", splits={"val": 8})
    rc = main(["train", "--store", str(empty), "--name", "x", "--json"])
    assert rc == 2 and "no 'train' shards" in capsys.readouterr().err


def write_features(store, k=4, seed=0):
    """A feature store by hand (schema FEATURES): K random pad crops per train image."""
    import pyarrow as pa

    from swift_sampler.storage import atomic_write_json, atomic_write_parquet
    from swift_sampler.storage.schemas import FEATURES

    layout = StoreLayout(store)
    n = pq.read_table(layout.samples, filters=[("split", "=", "train")]).num_rows
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in FEATURES.names}
    for i in range(n):
        for j in range(k):
            rows["index"].append(i)
            rows["crop"].append(j)
            rows["top"].append(int(rng.integers(-1, 2)))
            rows["left"].append(int(rng.integers(-1, 2)))
            rows["height"].append(8)
            rows["width"].append(8)
            rows["flip"].append(bool(rng.integers(2)))
            rows["label"].append(0)
            rows["loss"].append(float(rng.random()))
            rows["entropy_r"].append(float(rng.random()))
            rows["grad_norm"].append(1.0)
    atomic_write_parquet(layout.features_dir / "part-000000.parquet", pa.table(rows, schema=FEATURES))
    atomic_write_json(layout.features_meta, {"done": True, "K": k})
    return rows


def test_stored_crops_filter_keeps_only_positive_tau_and_replays_exactly(small):
    from test_loader import replay_crops

    from swift_sampler.pipeline.ingest.decode import decode
    from swift_sampler.pipeline.sampler.function import UNIFORM
    from swift_sampler.train.loader import ShardDataset
    from swift_sampler.train.sampling import StoredCrops, tau_filter
    from swift_sampler.train.shardio import read_tar

    rows = write_features(small)
    stage = StoredCrops(small, UNIFORM)
    stage.tau[:, 2:] = 0.0  # crops 2 and 3 of every image must never be kept
    ds = ShardDataset(small, "train", batch_size=8, num_workers=0, candidates_per_image=2,
                      crop_stage=stage, batch_filter=tau_filter)
    images = {}
    for shard in StoreLayout(small).shards("train"):
        for m in read_tar(shard):
            if m and m["fname"].endswith(".png"):
                images[int(m["fname"].split("-")[1].split(".")[0])] = decode(m["data"], 3)
    stored = {(i, j): (t, le, h, w, f) for i, j, t, le, h, w, f in zip(
        rows["index"], rows["crop"], rows["top"], rows["left"], rows["height"], rows["width"],
        rows["flip"])}
    kept = 0
    for batch in ds:
        assert batch["candidates"] == 16 and len(batch["index"]) <= 8
        assert set(batch["crop_id"].tolist()) <= {0, 1}
        for i, j, c in zip(batch["index"].tolist(), batch["crop_id"].tolist(), batch["crop"].tolist()):
            assert tuple(c) == tuple(int(v) for v in stored[(i, j)])
        src = [images[i] for i in batch["index"].tolist()]
        assert torch.equal(replay_crops(src, batch["crop"]), batch["image"])
        kept += len(batch["index"])
    assert kept > 0


def test_train_with_sampler_logs_kept_fraction_and_flipped_share(small):
    from swift_sampler.pipeline.sampler.function import UNIFORM
    from swift_sampler.train.sampling import create_sampler_hook

    write_features(small)
    hook = create_sampler_hook(small, UNIFORM, features="store")
    summary = train(tiny_config(small, name="ss", epochs=1), sampler=hook)
    assert summary["kept_fraction"] == pytest.approx(0.5)
    assert 0.0 <= summary["flipped_kept_share"] <= 1.0
    metrics = json.loads((StoreLayout(small).run("ss") / "metrics.jsonl").read_text())
    assert metrics["kept_fraction"] == pytest.approx(0.5)


def test_train_uses_the_sampler_stage_its_file_records(small, tmp_path, caplog):
    """A sampler is chosen through one stage (how candidates are drawn and half kept); `train
    --sampler` defaults to that stage, and an explicit other one is trained but logged."""
    import logging

    from swift_sampler.pipeline.sampler.file import learned_with, save_sampler
    from swift_sampler.pipeline.sampler.function import UNIFORM

    write_features(small)
    base = ["train", "--store", str(small), "--model", "digits-net", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--allow-foreign-tables", "--json"]

    def stage(run):
        cfg = json.loads((StoreLayout(small).run(run) / "config.json").read_text())
        return cfg["sampler"]["features"], cfg["sampler"]["selection"]

    recorded = save_sampler(tmp_path / "image-es.json", UNIFORM,
                            {"learned_with": {"features": "image", "selection": "es"}})
    assert main([*base, "--name", "follows", "--sampler", str(recorded)]) == 0
    assert stage("follows") == ("image", "es")
    with caplog.at_level(logging.WARNING):
        assert main([*base, "--name", "asked", "--sampler", str(recorded), "--features", "store"]) == 0
    assert stage("asked") == ("store", "es")
    assert "searched with --features image; training with --features store" in caplog.text
    older = save_sampler(tmp_path / "older.json", UNIFORM, {})  # a file from before the record
    assert learned_with({}) == {} and learned_with({"learned_with": "image"}) == {}
    assert main([*base, "--name", "older", "--sampler", str(older)]) == 0
    assert stage("older") == ("store", "systematic")


def test_sampler_needs_a_feature_store(small):
    from swift_sampler.pipeline.sampler.function import UNIFORM
    from swift_sampler.train.sampling import create_sampler_hook

    with pytest.raises(StoreError, match="no feature store"):
        create_sampler_hook(small, UNIFORM, features="store")


def test_an_exploding_loss_is_named_with_what_to_change():
    from swift_sampler.train.presets import TrainConfig
    from swift_sampler.train.trainer import exploding_loss

    config = TrainConfig(store="s", lr=0.1, batch_size=128)
    assert exploding_loss({"epoch": 0, "loss": 1.9, "val_loss": 2.2}, 10, config) is None
    alarm = exploding_loss({"epoch": 0, "loss": 6.98, "val_loss": 110.7}, 10, config)
    assert "epoch 1: train loss 6.98 and val loss 110.70" in alarm
    assert "lower --lr (now 0.1)" in alarm and "--batch-size (now 128)" in alarm
    assert exploding_loss({"epoch": 3, "loss": float("nan")}, 10, config) is None  # NaN: TrainingDiverged


def test_a_diverging_run_warns_and_records_it(digits_store, tmp_path, caplog):
    import logging
    import shutil

    from swift_sampler.train.presets import resolve_config
    from swift_sampler.train.trainer import TrainingDiverged, fit

    store = tmp_path / "store"
    shutil.copytree(digits_store, store)
    with caplog.at_level(logging.WARNING):
        try:
            summary = fit(resolve_config(store, preset="digits", name="hot", epochs=1, lr=30.0,
                                         workers=0, progress=False)).summary
        except TrainingDiverged:  # went all the way to NaN: also a clear stop
            return
    assert summary["warnings"] and "the run is diverging" in caplog.text


def test_a_run_resumes_only_with_its_recorded_recipe(small):
    from swift_sampler.storage.errors import UsageError
    from swift_sampler.train.trainer import SamplerHook

    class Stop(Exception):
        pass

    def stop(metrics):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_config(small, name="r"), on_epoch_end=stop)
    with pytest.raises(UsageError, match=r"lr: recorded 0.05, now 0.1"):
        train(tiny_config(small, name="r", resume=True, lr=0.1))
    with pytest.raises(UsageError, match="epochs.*seed|seed"):
        train(tiny_config(small, name="r", resume=True, seed=3))
    hook = SamplerHook(candidates_per_image=1, step_filter=lambda b: b, describe={"method": "x"})
    with pytest.raises(UsageError, match="sampler: recorded None"):
        train(tiny_config(small, name="r", resume=True), sampler=hook)
    # nothing was changed by the refusals: the recorded recipe resumes
    assert train(tiny_config(small, name="r", resume=True))["start_epoch"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_evaluate_on_a_missing_gpu_is_refused_by_name(small, tmp_path, capsys):
    ckpt = train(tiny_config(small, name="e", epochs=1))["checkpoint"]
    with pytest.raises(ValueError, match="asks for a GPU but this machine has none"):
        evaluate(small, ckpt, "val", device="cuda", workers=0)
    assert main(["evaluate", "--store", str(small), "--checkpoint", ckpt, "--split", "val",
                 "--device", "cuda", "--workers", "0"]) == 2
    assert "asks for a GPU" in capsys.readouterr().err


def test_a_store_that_cannot_be_written_is_named_not_a_traceback(small, monkeypatch, capsys):
    import errno

    import swift_sampler.train.trainer as trainer

    def read_only(path, what):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(trainer, "exclusive_lock", read_only)
    code = main(["train", "--store", str(small), "--name", "ro", "--model", "digits-net",
                 "--epochs", "1", "--batch-size", "8", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "read-only" in err and "Traceback" not in err

    def bug(path, what):
        raise OSError(errno.EBADF, "Bad file descriptor")  # not the user's doing: a traceback

    monkeypatch.setattr(trainer, "exclusive_lock", bug)
    with pytest.raises(OSError):
        main(["train", "--store", str(small), "--name", "ro2", "--model", "digits-net",
              "--epochs", "1", "--batch-size", "8", "--workers", "0"])


def test_a_checkpoint_of_other_classes_is_refused_by_name(small, tmp_path, capsys):
    import swift_sampler as ss

    ckpt = train(tiny_config(small, name="w", epochs=1))["checkpoint"]
    other = make_store(tmp_path / "other", splits={"train": 32, "val": 16}, classes=4,
                       shard_size=16)
    manifest_path = StoreLayout(other).manifest
    manifest = json.loads(manifest_path.read_text())
    manifest["classes"] = ["w", "x", "y", "z"]  # as many classes, other ones
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="trained on the classes"):
        evaluate(other, ckpt, "val", workers=0)
    with pytest.raises(CheckpointError, match="trained on the classes"):
        ss.build_features(other, ckpt, crops_per_image=1, progress=False, workers=0)
    assert main(["pipeline", "build-features", "--store", str(other), "--checkpoint", ckpt]) == 2
    assert "trained on the classes" in capsys.readouterr().err
    # the store it was trained on is fine
    assert 0 <= evaluate(small, ckpt, "val", workers=0)["top1"] <= 1
