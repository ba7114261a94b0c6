"""build-features on tiny stores: row invariants, replay, resume, ranks, provenance, bad input."""

from __future__ import annotations

import io
import json
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from swift_sampler.pipeline.features.build import NonFiniteScoreError, build_features, read_shard
from swift_sampler.pipeline.features.crops import apply_crop, plain_crop
from swift_sampler.pipeline.features.scoring import score_batch
from swift_sampler.pipeline.ingest.decode import decode
from swift_sampler.storage import (
    LockedError,
    StoreError,
    StoreLayout,
    exclusive_lock,
    sha256_file,
    write_manifest,
)
from swift_sampler.storage.schemas import FEATURES, SAMPLES

K = 4


def make_store(root, *, n=40, shard_size=12, classes=4, size=8, seed=0, noise=0.3, empty_train=False):
    """A store per the contract (grey PNG shards, samples.parquet, manifest written last)."""
    layout = StoreLayout(root)
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    true = rng.integers(classes, size=n)
    noisy = rng.random(n) < noise
    label = np.where(noisy, (true + rng.integers(1, classes, size=n)) % classes, true)
    rows, shards = [], []
    for s, start in enumerate(range(0, 0 if empty_train else n, shard_size)):
        path = layout.shard("train", s)
        idx = range(start, min(n, start + shard_size))
        with tarfile.open(path, "w") as tar:
            for i in idx:
                key = f"train-{i:08d}"
                px = (rng.random((size, size)) * 80 + true[i] * 40).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(px).save(buf, format="PNG")
                meta = {"index": i, "label": int(label[i]), "true_label": int(true[i]), "noisy": bool(noisy[i])}
                for ext, data in (("png", buf.getvalue()), ("cls", str(label[i]).encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append(("train", i, key, s, f"src/{i}", int(label[i]), int(true[i]), bool(noisy[i])))
        shards.append({"file": path.name, "count": len(idx), "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)})
    cols = list(zip(*rows)) if rows else [[] for _ in SAMPLES]
    pq.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, SAMPLES)],
                                        schema=SAMPLES), layout.samples)
    write_manifest(layout, {
        "store_id": str(uuid.uuid4()), "created": "now", "source": "synthetic",
        "classes": [f"c{i}" for i in range(classes)],
        "image": {"ext": "png", "channels": 1, "height": size, "width": size},
        "splits": {"train": {"count": len(rows), "shards": shards}},
        "noise": {"spec": f"symmetric:{noise}", "kind": "symmetric", "rate": noise,
                  "realised": {"train": float(noisy.mean())}},
        "seed": seed, "skipped": [], "versions": {}})
    return layout.root


class TinyNet(nn.Module):
    """uint8 (B, 1, H, W) -> logits, with ``.features`` and a linear ``.head``."""

    def __init__(self, classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(24, classes)

    def features(self, x):
        return self.body(x.float() / 255 if x.dtype == torch.uint8 else x)

    def forward(self, x):
        return self.head(self.features(x))


def run(store, model=None, **kw):
    kw = {"crops_per_image": K, "progress": False, "batch_size": 16, "tables": False, **kw}
    return build_features(store, model or TinyNet(), **kw)


def rows(store) -> pa.Table:
    parts = StoreLayout(store).feature_parts()
    return pq.read_table(parts).sort_by([("index", "ascending"), ("crop", "ascending")])


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store")


def test_rows_are_complete_unique_and_replay_exactly(store):
    summary = run(store)
    t = rows(store)
    assert summary["rows"] == t.num_rows == 40 * K and t.schema.remove_metadata() == FEATURES
    keys = t["index"].to_numpy() * K + t["crop"].to_numpy()
    assert np.array_equal(keys, np.arange(40 * K))
    meta = json.loads(StoreLayout(store).features_meta.read_text())
    assert meta["done"] and meta["rows"] == 40 * K and meta["crops_per_image"] == K
    # Crop 0 is the plain view; stored parameters + apply_crop replay the scored pixels exactly.
    images = {i: (lab, img) for i, lab, img in read_shard(StoreLayout(store).shard("train", 1), channels=1)}
    model = TinyNet().eval()
    for r in t.filter(pa.compute.is_in(t["index"], pa.array(list(images)))).to_pylist()[:12]:
        label, image = images[r["index"]]
        crop = (r["top"], r["left"], r["height"], r["width"], r["flip"])
        if r["crop"] == 0:
            assert crop == tuple(plain_crop(8, 8))
        x = apply_crop(image, crop).unsqueeze(0)
        s = score_batch(model, x, torch.tensor([label]))
        np.testing.assert_allclose([s["loss"].item(), s["entropy_r"].item(), s["grad_norm"].item()],
                                   [r["loss"], r["entropy_r"], r["grad_norm"]], rtol=1e-4)
        assert r["label"] == label


def test_same_rows_whatever_the_batch_size_and_workers_other_seed_other_crops(tmp_path):
    a, b = make_store(tmp_path / "a"), make_store(tmp_path / "b")
    run(a, batch_size=7, workers=0)
    run(b, batch_size=64, workers=2)
    ta, tb = rows(a), rows(b)
    for name in ("index", "crop", "top", "left", "flip", "label"):
        assert ta[name].equals(tb[name])
    np.testing.assert_allclose(ta["loss"].to_numpy(), tb["loss"].to_numpy(), rtol=1e-5)
    run(b, seed=1, overwrite=True)
    assert not rows(b)["top"].equals(ta["top"])


def test_resume_after_a_crash_gives_identical_rows(tmp_path):
    full, crashed = make_store(tmp_path / "full"), make_store(tmp_path / "crash")
    run(full)

    def boom(shard, path):
        if shard == 1:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected"):
        run(crashed, on_part=boom)
    layout = StoreLayout(crashed)
    assert [p.name for p in layout.feature_parts()] == ["part-000000.parquet", "part-000001.parquet"]
    assert not layout.features_meta.exists()
    (layout.features_dir / ".tmp-part-000002.parquet.x").write_bytes(b"half a part")
    summary = run(crashed)
    assert summary["parts_skipped"] == 2 and summary["parts_written"] == 2
    assert not list(layout.features_dir.glob(".tmp-*"))
    assert rows(crashed).equals(rows(full))


def _rank_worker(rank, world, init, store):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        run(store, rank=rank, world_size=world)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_the_same_rows_as_one_process(tmp_path):
    one, two = make_store(tmp_path / "one"), make_store(tmp_path / "two")
    run(one)
    # fork: the children inherit the imported modules instead of importing torch again.
    torch.multiprocessing.start_processes(_rank_worker, args=(2, f"file://{tmp_path}/rdv", str(two)),
                                          nprocs=2, start_method="fork")
    assert json.loads(StoreLayout(two).features_meta.read_text())["done"]
    assert rows(two).equals(rows(one))


def test_features_view_and_noise_density_figure(store):
    from swift_sampler.figures.noise_density import plot_noise_density
    from swift_sampler.storage import query

    with pytest.raises(StoreError, match="build-features"):
        plot_noise_density(store)
    run(store, tables=True, quantiles=16, angles=8)
    assert json.loads(StoreLayout(store).tables_meta.read_text())["rows"] == 40 * K
    assert query(store, "SELECT count(*) AS n FROM cdf").to_pylist() == [{"n": 2 * 17}]
    t = query(store, "SELECT count(*) AS n, count(DISTINCT (index, crop)) AS u, min(cdf_loss) AS lo, "
                     "max(cdf_loss) AS hi, count(key) AS joined FROM features").to_pylist()[0]
    assert t == {"n": 40 * K, "u": 40 * K, "lo": pytest.approx(1 / (40 * K)), "hi": 1.0, "joined": 40 * K}
    path = plot_noise_density(store)
    assert path == StoreLayout(store).root / "figures" / "noise_density.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path, store):
    with pytest.raises(StoreError, match="predicts 3 classes but the store has 4"):
        run(store, TinyNet(classes=3))
    with pytest.raises(StoreError, match="no 'train' shards"):
        run(make_store(tmp_path / "empty", empty_train=True))
    with pytest.raises(ValueError, match="grad_norm"):
        run(store, grad_norm="exact")
    with pytest.raises(ValueError, match="process group"):
        run(store, rank=1, world_size=2)
    with exclusive_lock(StoreLayout(store).lock("features"), "build-features"), \
            pytest.raises(LockedError, match="build-features"):
        run(store)


def test_non_finite_scores_are_reported_and_never_written(store):
    model = TinyNet()
    with torch.no_grad():
        model.head.bias[2] = float("nan")
    with pytest.raises(NonFiniteScoreError, match=f"{40 * K} crops of 40 images had NaN"):
        run(store, model)
    assert StoreLayout(store).feature_parts() == [] and not StoreLayout(store).features_meta.exists()


def test_features_of_another_checkpoint_are_refused_unless_overwritten(store):
    run(store, checkpoint_sha256="a" * 64)
    with pytest.raises(StoreError, match="another checkpoint"):
        run(store, checkpoint_sha256="b" * 64)
    with pytest.raises(StoreError, match="crops_per_image"):
        run(store, checkpoint_sha256="a" * 64, crops_per_image=2)
    run(store, TinyNet(seed=5), checkpoint_sha256="b" * 64, overwrite=True)
    meta = json.loads(StoreLayout(store).features_meta.read_text())
    assert meta["checkpoint_sha256"] == "b" * 64 and rows(store).num_rows == 40 * K


def test_cli_builds_features_from_a_checkpoint(store, tmp_path, capsys):
    from swift_sampler.cli import main
    from swift_sampler.train.checkpoint import save_checkpoint
    from swift_sampler.train.models import create_model

    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, create_model("digits-net", 4, in_chans=1, image_size=8))
    argv = ["pipeline", "build-features", "--store", str(store), "--checkpoint", str(ckpt),
            "--quantiles", "16", "--angles", "8", "--crops-per-image", "2", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 80 and summary["parts_written"] == 4 and summary["tables"]["rows"] == 80
    meta = json.loads(StoreLayout(store).features_meta.read_text())
    assert meta["checkpoint_sha256"] == sha256_file(ckpt)
    assert main([*argv[:-3], "--crops-per-image", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    save_checkpoint(other, create_model("digits-net", 10, in_chans=1, image_size=8))
    assert main([*argv[:5], str(other)]) == 2
    assert "predicts 10 classes" in capsys.readouterr().err
    assert main([*argv[:5], str(tmp_path / "missing.pt")]) == 2


def test_decoded_images_match_the_stored_pngs(store):
    layout = StoreLayout(store)
    with tarfile.open(layout.shard("train", 0)) as tar:
        png = tar.extractfile("train-00000000.png").read()
    first = next(read_shard(layout.shard("train", 0), channels=1))
    assert first[0] == 0 and torch.equal(first[2], decode(png, 1))


def test_the_features_folder_holds_parquet_only_and_opens_as_a_dataset(tmp_path):
    """pandas, pyarrow and DuckDB read ``STORE/features/`` as it is (features.json is beside it)."""
    import duckdb
    import pandas as pd
    import pyarrow.parquet as pq

    from swift_sampler.pipeline.features.build import build_features
    from swift_sampler.pipeline.ingest.build import ingest
    from swift_sampler.train.models import create_model

    store = tmp_path / "store"
    ingest("digits", store, val_frac=0.2, test_frac=0.2, limit=200, shard_size=60, progress=False)
    torch.manual_seed(0)
    build_features(store, create_model("digits-net", 10, 1, 8), crops_per_image=2, progress=False,
                   device="cpu", quantiles=16, angles=4)
    folder = StoreLayout(store).features_dir
    assert {p.suffix for p in folder.iterdir()} == {".parquet"}
    assert StoreLayout(store).features_meta == store / "features.json"
    rows = 2 * 120
    assert len(pd.read_parquet(folder)) == rows
    assert pq.read_table(folder).num_rows == rows
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*')").fetchall()[0][0] == rows
