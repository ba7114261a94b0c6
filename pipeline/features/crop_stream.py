"""Crops of whole shards, batched for scoring: the input side of build-features.

A chain of generators, one job each: ``read_shard`` (tar -> index, label, image) ->
``make_crops`` (-> K crops per image) -> ``batch_crops`` (-> tensors). ``ShardCrops`` runs the
chain per shard inside ``DataLoader`` workers; ``iter_shard_batches`` drives it.

Invariants: crop 0 of image ``i`` is ``plain_crop``; crops ``1..K-1`` come from a generator
seeded by ``(seed, i)`` alone, so rows never depend on rank, shard order, worker count or
batch size. Only ``index``, the training label and the image are read from a shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swift_sampler.storage import StoreError

from ..ingest.decode import CorruptSampleError, decode
from ..ingest.shards import IMAGE_EXTS, ShardInfo, group_members, read_tar
from .crops import Crop, apply_crop, crop_policy, plain_crop, sample_crop


def read_shard(path: Path, *, channels: int, sha256: str | None = None, size: int | None = None
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(index, label, image uint8 (C, H, W))`` for every sample of one shard tar.

    ``KEY.json`` is not read: it holds the ground truth, which no feature may see. The index
    comes from the key (``{split}-{index:08d}``), the label from ``KEY.cls``. ``sha256`` and
    ``size``: the manifest's record of the shard, checked after its last sample (an image
    that does not decode is reported first, by key).

    Raises:
        StoreError: a sample without image or label, an image that does not decode, a
            damaged tar (``ShardReadError``) or one whose bytes differ from the manifest
            (``ShardChecksumError``), each naming the shard.
    """
    # Deferred: an image that does not decode is named first; a shard that reads whole but
    # differs from the manifest fails after its last sample, before its part is written.
    tar = read_tar(path, sha256=sha256, size=size, defer=True)
    for sample in group_members(tar, keep=("cls", *IMAGE_EXTS)):
        key = sample["__key__"].rpartition("/")[2]
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None or "cls" not in sample:
            raise StoreError(f"{path.name}: sample {key} lacks an image or a .cls label; re-run ingest")
        try:
            row = int(key.rsplit("-", 1)[1]), int(sample["cls"]), decode(image, channels)
        except CorruptSampleError as e:
            raise StoreError(f"{path.name}: sample {key}: {e}; re-run ingest") from None
        except (ValueError, IndexError):
            raise StoreError(f"{path.name}: sample {key} has a malformed key or label") from None
        yield row


def crops_for(index: int, height: int, width: int, *, crops_per_image: int, seed: int) -> list[Crop]:
    """The K crops of image ``index``: the plain view, then K-1 crops seeded by ``(seed, index)``."""
    rng = np.random.default_rng((seed, index))
    return [plain_crop(height, width)] + [sample_crop(rng, height, width) for _ in range(crops_per_image - 1)]


def make_crops(src: Iterable[tuple[int, int, torch.Tensor]], *, crops_per_image: int, seed: int,
               out_size: tuple[int, int] | None) -> Iterator[tuple[int, int, Crop, int, torch.Tensor]]:
    """``(index, label, image)`` -> ``(index, crop_no, crop, label, pixels)``, K per image."""
    for index, label, image in src:
        _, h, w = image.shape
        for k, crop in enumerate(crops_for(index, h, w, crops_per_image=crops_per_image, seed=seed)):
            yield index, k, crop, label, apply_crop(image, crop, out_size)


def batch_crops(src: Iterable[tuple], *, batch_size: int) -> Iterator[dict[str, Any]]:
    """Group crops into ``{"x": uint8 (B, C, H, W), "index", "crop", "label": int64 (B,),
    "crops": int64 (B, 5) = (top, left, height, width, flip)}``."""
    buf: list[tuple] = []

    def collate() -> dict[str, Any]:
        index, crop_no, crops, labels, pixels = zip(*buf)
        return {"x": torch.stack(pixels), "index": torch.tensor(index), "crop": torch.tensor(crop_no),
                "label": torch.tensor(labels), "crops": torch.tensor(crops, dtype=torch.int64)}

    for item in src:
        buf.append(item)
        if len(buf) == batch_size:
            yield collate()
            buf = []
    if buf:
        yield collate()


class ShardCrops(torch.utils.data.IterableDataset):
    """Batches of crops of whole shards, for a ``DataLoader`` (``batch_size=None``).

    ``shards``: ``(shard number, path)`` or ``(shard number, ShardInfo)``; a ``ShardInfo``
    carries the manifest's size and sha256 of the shard, which are then checked. Worker ``w``
    of ``W`` reads shards ``w, w + W, ...``; a batch never spans two shards, so a shard's rows
    do not depend on the number of workers. Every batch carries ``"shard"``; after the last
    batch of a shard comes ``{"shard": s, "end": True}``. Errors come back as
    ``{"error": message}`` so the caller raises them with their own message.
    """

    def __init__(self, shards: list[tuple[int, Path | ShardInfo]], *, channels: int, crops_per_image: int,
                 seed: int, out_size: tuple[int, int] | None, batch_size: int) -> None:
        self.shards, self.channels, self.k = shards, channels, crops_per_image
        self.seed, self.out_size, self.batch_size = seed, out_size, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        try:
            for s, shard in mine:
                path, sha256, size = ((Path(shard.path), shard.sha256, shard.bytes)
                                      if isinstance(shard, ShardInfo) else (Path(shard), None, None))
                if not path.is_file():
                    raise StoreError(f"shard {path.name} listed in the manifest is missing; re-run ingest")
                src = read_shard(path, channels=self.channels, sha256=sha256, size=size)
                crops = make_crops(src, crops_per_image=self.k, seed=self.seed, out_size=self.out_size)
                for batch in batch_crops(crops, batch_size=self.batch_size):
                    yield {**batch, "shard": s, "end": False}
                yield {"shard": s, "end": True}
        except StoreError as e:
            yield {"error": str(e)}


def iter_shard_batches(shards: list[tuple[int, Path | ShardInfo]], *, workers: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """``ShardCrops`` through a ``DataLoader`` with ``workers`` processes (0: in this process).

    Decoding and cropping are Python-heavy: worker processes keep them off the GIL of the
    process that runs the model, and overlap them with it.
    """
    dataset = ShardCrops(shards, **kwargs)
    workers = min(workers, len(shards))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None,
                                         persistent_workers=False)
    for batch in loader:
        if "error" in batch:
            raise StoreError(batch["error"])
        yield batch


def output_size(manifest: dict, image_size: int | None) -> tuple[int, int] | None:
    """Output side of the crops of a store: None for pad crops of small images kept at their
    own size, else ``(side, side)`` (``image_size``, or 224 for RRC / varying sizes).

    The training loader uses this rule too, so features score the crops training sees.
    """
    img = manifest.get("image") or {}
    h, w = img.get("height"), img.get("width")
    if h and w and crop_policy(h, w) == "pad" and (image_size is None or image_size == h == w):
        return None  # pad crops keep the image's own size
    side = image_size or (224 if not h or crop_policy(h, w) == "rrc" else max(h, w))
    return (int(side), int(side))
