"""The sharded loader: epochs, ranks and workers, crops that replay, corrupt samples, hooks."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest
import torch

from swift_sampler.pipeline.features.crops import Crop, apply_crop
from swift_sampler.pipeline.ingest.decode import decode
from swift_sampler.pipeline.ingest.shards import write_shards
from swift_sampler.pipeline.ingest.sources import encode_png
from swift_sampler.storage import StoreError, StoreLayout, atomic_write_parquet, write_manifest
from swift_sampler.storage.schemas import SAMPLES
from swift_sampler.train.loader import ShardDataset, create_loader, cut_crops
from swift_sampler.train.shardio import read_tar


def replay_crops(images, crops: torch.Tensor, out_size=None) -> torch.Tensor:
    """The obvious reference: re-cut recorded crops (``batch["crop"]``, ``(B, 5)``) one by one
    with ``apply_crop``."""
    return torch.stack([apply_crop(img, Crop(*(int(v) for v in c[:4]), bool(c[4])), out_size)
                        for img, c in zip(images, crops)])


def make_store(root, *, splits=None, size=8, channels=3, classes=4, shard_size=16, seed=0,
               noise=0.0, corrupt=(), images=None, labels=None):
    """A tiny store per the store contract: PNG shards, samples.parquet, manifest (last).

    ``splits``: {split: count}; ``images``/``labels``: per split arrays to use instead of random
    pixels; ``noise``: share of train labels flipped (ground truth kept in samples/json);
    ``corrupt``: keys whose image bytes are replaced by garbage.
    """
    splits = splits or {"train": 64, "val": 16}
    rng = np.random.default_rng(seed)
    layout = StoreLayout(root)
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    rows = {name: [] for name in SAMPLES.names}
    manifest_splits = {}
    for split, n in splits.items():
        if images is not None:
            pix, clean = images[split], np.asarray(labels[split])
        else:
            shape = (n, size, size, channels) if channels == 3 else (n, size, size)
            pix = rng.integers(0, 256, shape, dtype=np.uint8)
            clean = rng.integers(0, classes, n)
        used = clean.copy()
        if split == "train" and noise:
            flip = rng.random(n) < noise
            used[flip] = (clean[flip] + 1 + rng.integers(0, classes - 1, flip.sum())) % classes
        samples = []
        for i in range(n):
            key = f"{split}-{i:08d}"
            meta = {"index": i, "label": int(used[i])}
            if noise and split == "train":
                meta.update(true_label=int(clean[i]), noisy=bool(used[i] != clean[i]))
            data = b"not an image" if key in corrupt else encode_png(pix[i])
            samples.append({"__key__": key, "png": data, "cls": str(int(used[i])).encode(),
                            "json": json.dumps(meta).encode()})
        shards = write_shards(iter(samples), folder=layout.shards_dir, split=split,
                              shard_size=shard_size)
        manifest_splits[split] = {"count": n, "shards": shards}
        rows["split"] += [split] * n
        rows["index"] += list(range(n))
        rows["key"] += [f"{split}-{i:08d}" for i in range(n)]
        rows["shard"] += [i // shard_size for i in range(n)]
        rows["source"] += [f"{split}/{i}" for i in range(n)]
        rows["label"] += used.tolist()
        rows["true_label"] += clean.tolist()
        rows["noisy"] += (used != clean).tolist()
    atomic_write_parquet(layout.samples, pa.table(rows, schema=SAMPLES))
    write_manifest(layout, {
        "store_id": str(uuid.uuid4()), "source": "test", "classes": [f"c{i}" for i in range(classes)],
        "image": {"ext": "png", "channels": channels, "height": size, "width": size},
        "splits": manifest_splits, "noise": {"spec": "none", "kind": "none", "rate": noise},
        "seed": seed, "skipped": [],
    })
    return root


def epoch_batches(ds, epoch):
    ds.set_epoch(epoch)
    return list(ds)


def indices(batches):
    return torch.cat([b["index"] for b in batches]).tolist()


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s", splits={"train": 64, "val": 20}, shard_size=16)


def test_next_epoch_new_order_same_composition(store):
    ds = ShardDataset(store, "train", batch_size=8, num_workers=0, shuffle_buffer=32)
    a, b = indices(epoch_batches(ds, 0)), indices(epoch_batches(ds, 1))
    assert sorted(a) == sorted(b) == list(range(64))
    assert a != b
    again = indices(epoch_batches(ds, 0))
    assert again == a  # same seed and epoch -> same order


def test_same_seed_same_batches_different_seed_differs(store):
    one = epoch_batches(ShardDataset(store, "train", batch_size=8, num_workers=0, seed=3), 2)
    two = epoch_batches(ShardDataset(store, "train", batch_size=8, num_workers=0, seed=3), 2)
    other = epoch_batches(ShardDataset(store, "train", batch_size=8, num_workers=0, seed=4), 2)
    for x, y in zip(one, two):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["crop"], y["crop"])
    assert indices(one) != indices(other)


def test_batches_carry_index_label_crop(store):
    batch = epoch_batches(ShardDataset(store, "train", batch_size=8, num_workers=0), 0)[0]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 8, 8)
    assert batch["crop"].shape == (8, 5) and batch["crop_id"].tolist() == [-1] * 8
    labels = dict(zip(*_labels(store, "train")))
    assert batch["label"].tolist() == [labels[i] for i in batch["index"].tolist()]


def _labels(store, split):
    import pyarrow.parquet as pq

    t = pq.read_table(StoreLayout(store).samples).to_pylist()
    rows = [r for r in t if r["split"] == split]
    return [r["index"] for r in rows], [r["label"] for r in rows]


def test_replayed_crop_equals_loader_pixels(store):
    images = {}
    for shard in sorted(StoreLayout(store).shards("train")):
        key = None
        for m in read_tar(shard):
            if m and m["fname"].endswith(".png"):
                key = int(m["fname"].split("-")[1].split(".")[0])
                images[key] = decode(m["data"], 3)
    for batch in epoch_batches(ShardDataset(store, "train", batch_size=16, num_workers=0), 1):
        src = [images[i] for i in batch["index"].tolist()]
        assert torch.equal(replay_crops(src, batch["crop"]), batch["image"])


def test_cut_crops_equals_apply_crop_any_window():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(4, 12, 2)
        ch, cw = rng.integers(2, 14, 2)
        src = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8) for _ in range(9)]
        crops = [Crop(int(rng.integers(-5, h)), int(rng.integers(-5, w)), int(ch), int(cw),
                      bool(rng.integers(2))) for _ in range(9)]
        expect = torch.stack([apply_crop(s, c) for s, c in zip(src, crops)])
        assert torch.equal(cut_crops(src, crops), expect)


def reference_crop(image, crop):
    """Pixel by pixel: output (i, j) shows image (top + i, left + j'), j' mirrored when
    flipped, zero outside the image."""
    a = image.numpy()
    c, h, w = a.shape
    top, left, ch, cw, flip = crop
    out = np.zeros((c, ch, cw), dtype=a.dtype)
    for i in range(ch):
        for j in range(cw):
            y, x = top + i, left + (cw - 1 - j if flip else j)
            if 0 <= y < h and 0 <= x < w:
                out[:, i, j] = a[:, y, x]
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_apply_crop_equals_pixel_reference(dtype):
    """Windows inside, partly outside and wholly outside the image, flipped or not; on CPU
    (the NumPy fast path) and through the torch path (a tensor that requires grad)."""
    rng = np.random.default_rng(int(torch.finfo(dtype).bits if dtype.is_floating_point else 8))
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        ch, cw = (int(v) for v in rng.integers(1, 12, 2))
        crop = Crop(int(rng.integers(-ch - 2, h + 3)), int(rng.integers(-cw - 2, w + 3)), ch, cw,
                    bool(rng.integers(2)))
        if dtype == torch.uint8:
            image = torch.randint(0, 256, (3, h, w), dtype=dtype)
        else:
            image = torch.randn(3, h, w, dtype=dtype) * 100
        expect = reference_crop(image, crop)
        got = apply_crop(image, crop)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, expect), crop
        assert torch.equal(apply_crop(image, crop, (ch, cw)), expect)  # out_size = window: no resize
        if dtype.is_floating_point:
            slow = apply_crop(image.clone().requires_grad_(True), crop)
            assert torch.equal(slow.detach(), expect), crop
    outside = Crop(-20, 3, 4, 5, True)  # wholly above the image
    assert torch.equal(apply_crop(torch.ones(2, 6, 6, dtype=dtype), outside), torch.zeros(2, 4, 5, dtype=dtype))


def test_apply_crop_does_not_alias_the_image():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    before = image.clone()
    for crop in (Crop(0, 0, 8, 8, False), Crop(-2, 1, 8, 8, True)):
        out = apply_crop(image, crop)
        out.fill_(7)
        assert torch.equal(image, before)


@pytest.mark.parametrize("shard_size", [8, 24])
def test_ranks_and_workers_partition_the_split(tmp_path, shard_size):
    # 8 shards >= 2 ranks x 2 workers: split by shard; 3 shards < 4: split by sample.
    store = make_store(tmp_path / "s", splits={"train": 64}, shard_size=shard_size)
    per_rank = []
    for rank in range(2):
        loader, ds = create_loader(store, "train", batch_size=4, rank=rank, world_size=2,
                                   num_workers=2, train=False)
        per_rank.append(indices(list(loader)))
        assert len(list(loader)) == len(ds)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(64))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= shard_size


def test_every_rank_takes_the_same_number_of_steps(tmp_path):
    store = make_store(tmp_path / "s", splits={"train": 70}, shard_size=16)  # shards 16,16,16,16,6
    steps = []
    for rank in range(2):
        loader, ds = create_loader(store, "train", batch_size=4, rank=rank, world_size=2,
                                   num_workers=2)
        for epoch in range(2):
            ds.set_epoch(epoch)
            batches = list(loader)
            assert all(len(b["index"]) == 4 for b in batches)
            steps.append(len(batches))
    assert steps == [len(ds)] * 4 == [70 // (2 * 4)] * 4


def test_workers_give_the_same_composition_as_one_process(store):
    loader, ds = create_loader(store, "train", batch_size=8, num_workers=2)
    ds.set_epoch(0)
    a = indices(list(loader))
    ds.set_epoch(1)
    b = indices(list(loader))
    assert sorted(a) == sorted(b) == list(range(64)) and a != b


def test_eval_loader_reads_each_sample_once_with_plain_crop(store):
    ds = ShardDataset(store, "val", batch_size=8, train=False, num_workers=0)
    batches = list(ds)
    assert indices(batches) == list(range(20)) and len(batches) == len(ds) == 3
    assert all((b["crop"] == torch.tensor([0, 0, 8, 8, 0])).all() for b in batches)


def test_corrupt_sample_is_skipped_counted_and_named(tmp_path, caplog):
    store = make_store(tmp_path / "s", splits={"train": 32}, shard_size=16,
                       corrupt=("train-00000005",))
    ds = ShardDataset(store, "train", batch_size=4, num_workers=0, train=False)
    with caplog.at_level("WARNING"):
        batches = list(ds)
    got = indices(batches)
    assert 5 not in got and sorted(got) == [i for i in range(32) if i != 5]
    assert sum((b["skipped"] for b in batches), []) == ["train-00000005"]
    assert "train-00000005" in caplog.text


def test_damaged_shard_stops_the_loader_unless_skipping_is_asked(tmp_path):
    store = make_store(tmp_path / "s", splits={"train": 32}, shard_size=16)
    shard = StoreLayout(store).shards("train")[1]
    data = bytearray(shard.read_bytes())
    data[512 * 20] ^= 0xFF  # inside a later member's header or data: header checksum breaks
    cut = len(data) // 2
    shard.write_bytes(bytes(data[:cut]))  # and truncated
    ds = ShardDataset(store, "train", batch_size=4, num_workers=0, train=False)
    with pytest.raises(StoreError, match="train-000001.tar is damaged"):
        list(ds)
    ds = ShardDataset(store, "train", batch_size=4, num_workers=0, train=False, skip_damaged=True)
    got = indices(list(ds))
    assert set(range(16)) <= set(got) and len(got) < 32


def _list_count(store, shard: int, count: int) -> None:
    """Rewrite the manifest's sample count of one train shard (its checksums stay true)."""
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][shard]["count"] = count
    manifest["splits"]["train"]["count"] = sum(s["count"] for s in manifest["splits"]["train"]["shards"])
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("listed", [8, 20], ids=["understated", "overstated"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_manifest_that_miscounts_a_whole_shard_stops_the_loader(tmp_path, listed, train):
    store = make_store(tmp_path / "s", splits={"train": 32}, shard_size=16)
    _list_count(store, 1, listed)
    # shuffle_buffer=1: no read-ahead, so the epoch's quota (from the manifest) can end inside
    # the miscounted shard; skip_damaged: a miscount is not damage to skip.
    for epoch in range(3):
        ds = ShardDataset(store, "train", batch_size=4, num_workers=0, train=train,
                          shuffle_buffer=1, skip_damaged=True)
        ds.set_epoch(epoch)
        with pytest.raises(StoreError, match=f"train-000001.tar holds 16 samples but the manifest lists {listed}"):
            list(ds)


def test_no_train_shards_is_a_clear_error(tmp_path):
    store = make_store(tmp_path / "s", splits={"val": 8})
    with pytest.raises(StoreError, match="no 'train' shards"):
        ShardDataset(store, "train", batch_size=4)


def keep_first_half(batch, *, rng, size):
    """A stand-in batch filter: keeps ``size`` crops chosen by ``rng``, records candidates."""
    keep = torch.from_numpy(np.sort(rng.permutation(len(batch["index"]))[:size]))
    out = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    out["candidates"] = len(batch["index"])
    return out


def test_candidates_and_batch_filter_hook(store):
    ds = ShardDataset(store, "train", batch_size=8, num_workers=0, candidates_per_image=2,
                      batch_filter=keep_first_half)
    batches = epoch_batches(ds, 0)
    assert len(batches) == len(ds) == 8
    for b in batches:
        assert b["image"].shape[0] == 8 and b["candidates"] == 16
    with pytest.raises(ValueError, match="batch_filter"):
        ShardDataset(store, "train", batch_size=8, candidates_per_image=2)


def test_augmentations_draw_the_crops_they_name():
    from swift_sampler.pipeline.features.crops import AUGMENTATIONS, plain_crop, sample_crop

    assert AUGMENTATIONS == ("crop-flip", "crop", "flip", "none")
    plain = plain_crop(32, 32)
    for seed in range(50):
        default = sample_crop(np.random.default_rng(seed), 32, 32)
        assert sample_crop(np.random.default_rng(seed), 32, 32, augment="crop-flip") == default
        crop = sample_crop(np.random.default_rng(seed), 32, 32, augment="crop")
        assert crop == default._replace(flip=False)  # the same window, never mirrored
        flip = sample_crop(np.random.default_rng(seed), 32, 32, augment="flip")
        assert flip == plain._replace(flip=default.flip)  # the plain window, mirrored alike
        rng = np.random.default_rng(seed)
        assert sample_crop(rng, 32, 32, augment="none") == plain
        assert rng.integers(1 << 30) == np.random.default_rng(seed).integers(1 << 30)  # no draw
    with pytest.raises(ValueError, match="augmentation"):
        sample_crop(np.random.default_rng(0), 32, 32, augment="mixup")
