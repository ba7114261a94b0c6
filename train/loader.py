"""The sharded training loader: a list of small generator stages over WebDataset shards.

One pass of a worker, stage by stage (each a plain generator, as in webdataset):

    plan_worker        shards of this epoch for global worker (rank, worker), seeded shuffle
    read_shards        WebDataset samples {"__key__", "jpg"|"png", "cls", "json"} of each
                       shard (pipeline.ingest.shards' ustar parser, via train.shardio); a damaged
                       tar is cut short (logged, counted); a shard whose bytes differ from
                       the manifest's sha256 stops training unless the change shows as
                       corrupt samples, which decode_samples skips
    take_every         sample splitting when there are fewer shards than global workers
    shuffle            webdataset's shuffle buffer, seeded by (seed, epoch, rank, worker)
    decode_samples     {"key", "index", "label", "image" uint8 (C, H, W)}; corrupt -> skipped
    crop_stage         ``candidates`` crop-samples per image (default ``random_crops``):
                       crop parameters plus the decoded source image
    batch_samples      collate ``batch_size * candidates`` crop-samples; pixels are cut for
                       the whole batch at once (``cut_crops``, equal to ``apply_crop``)
    batch_filter       optional: keep ``batch_size`` of them (the sampler stage)

Like timm's ``reader_wds.py`` the pipeline is built lazily inside each DataLoader worker with
its own RNGs, ``set_epoch`` changes the shard order and the crops, and ``with_epoch``-style
quotas, computed from the manifest's per-shard counts, give every rank the same number of
steps: ``len(loader) = N // (world_size * batch_size)`` batches per rank (a partial last batch
is dropped). A worker whose shards run short of its quota starts another pass over them in a
new order; surplus samples wait for the next epoch's reshuffle. Evaluation loaders (``train=
False``) read every sample exactly once, in store order, with the plain crop.

Batches are dicts: ``image`` uint8 ``(B, C, H, W)``, ``label`` int64 ``(B,)`` (from ``KEY.cls``),
``index`` int64 ``(B,)`` (dense per split, from ``KEY.json``), ``crop`` int64 ``(B, 5)`` (top,
left, height, width, flip) that ``pipeline.features.crops.apply_crop`` replays exactly, ``crop_id``
int64 ``(B,)`` (-1 for a fresh random crop), plus whatever numeric fields a crop stage adds
(``loss``, ``entropy_r`` ...), and ``skipped`` (list of keys of corrupt samples dropped since the
worker's previous batch). The loader never reads ground-truth noise fields.

Hooks for the sampler stage (oversample-and-filter): ``candidates_per_image=2`` makes each
image yield two crop-samples; ``crop_stage`` replaces how they are chosen (e.g. two of the K
crops stored in the feature store, with their features); ``batch_filter(batch, rng=, size=)``
receives ``2B`` crop-samples and returns a batch of ``B``. Both run inside the workers, so they
must be picklable (module-level functions or objects).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from swift_sampler.pipeline.features.crop_stream import output_size
from swift_sampler.pipeline.features.crops import (
    AUGMENTATIONS,
    Crop,
    apply_crop,
    plain_crop,
    sample_crop,
)
from swift_sampler.pipeline.ingest.decode import CorruptSampleError, decode
from swift_sampler.pipeline.ingest.shards import IMAGE_EXTS, shard_infos
from swift_sampler.storage import StoreError, StoreLayout, read_manifest
from swift_sampler.storage.errors import UsageError

from .shardio import Shard, WorkerPlan, plan_worker, python_rng, read_shards, seed_ints, take_every

log = logging.getLogger(__name__)


class BatchFilter(Protocol):
    def __call__(self, batch: dict[str, Any], *, rng: np.random.Generator, size: int) -> dict[str, Any]: ...


CropStage = Callable[..., Iterator[dict[str, Any]]]


# ----------------------------------------------------------------------------- sample stages


def parse_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw WebDataset sample -> ``{"key", "index", "label", "ext"}`` without decoding the image.

    Raises:
        CorruptSampleError: no image bytes, an unreadable label or index.
    """
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise CorruptSampleError("no image member")
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptSampleError(f"unreadable KEY.json: {e}") from None
    if not isinstance(meta, dict):
        raise CorruptSampleError("KEY.json is not a JSON object")
    label = _as_int(raw["cls"] if "cls" in raw else meta.get("label"), "label")
    index = _as_int(meta.get("index"), "index")
    return {"key": raw.get("__key__", "?"), "index": index, "label": label, "ext": ext}


def parse_sample(raw: dict[str, Any], *, channels: int) -> dict[str, Any]:
    """A raw WebDataset sample -> ``{"key", "index", "label", "image"}``.

    Reads only ``index`` (and ``label`` when ``KEY.cls`` is missing) from ``KEY.json``.

    Raises:
        CorruptSampleError: no image bytes, an unreadable label or index, or an image that
            does not decode. Anything else is a bug and is not caught by the loader (as timm
            re-raises it).
    """
    meta = parse_meta(raw)
    ext = meta.pop("ext")
    return {**meta, "image": decode(raw[ext], channels)}


def undecoded_samples(src: Iterable[dict[str, Any]], *, skipped: list[str]) -> Iterator[dict[str, Any]]:
    """Stage: raw samples -> ``{"key", "index", "label", "data"}`` (image bytes, not decoded),
    for crop stages that choose before they decode (``choose_first``); unreadable metadata is
    logged, appended to ``skipped`` and dropped."""
    for raw in src:
        try:
            meta = parse_meta(raw)
        except _SAMPLE_ERRORS as e:
            _skip(raw, e, skipped)
            continue
        meta["data"] = raw[meta.pop("ext")]
        yield meta


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bytes | bytearray):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CorruptSampleError(f"{what} missing or not an integer: {value!r}")
    try:
        return int(value)
    except ValueError:
        raise CorruptSampleError(f"{what} is not an integer: {value!r}") from None


_SAMPLE_ERRORS = (CorruptSampleError,)


def is_damaged(raw: dict[str, Any], *, channels: int) -> bool:
    """True when ``decode_samples`` would skip ``raw`` (see ``parse_sample``)."""
    try:
        parse_sample(raw, channels=channels)
    except _SAMPLE_ERRORS:
        return True
    return False


def decode_samples(src: Iterable[dict[str, Any]], *, channels: int, skipped: list[str]
                   ) -> Iterator[dict[str, Any]]:
    """Stage: raw WebDataset samples -> ``{"key", "index", "label", "image"}`` (``parse_sample``).

    A sample without image bytes, with an unreadable label or index, or whose image does not
    decode is logged by key, appended to ``skipped`` and dropped.
    """
    for raw in src:
        try:
            sample = parse_sample(raw, channels=channels)
        except _SAMPLE_ERRORS as e:
            _skip(raw, e, skipped)
            continue
        yield sample


def _skip(raw: dict[str, Any], error: Exception, skipped: list[str]) -> None:
    key = raw.get("__key__", "?")
    log.warning("skipping corrupt sample %s (%s): %s", key, raw.get("__url__", "?"), error)
    skipped.append(key)


def random_crops(src: Iterable[dict[str, Any]], *, rng: np.random.Generator, candidates: int = 1,
                 augment: bool | str = True, **_: Any) -> Iterator[dict[str, Any]]:
    """Stage: per image, ``candidates`` crop-samples whose crop is drawn by ``sample_crop(rng)``
    (``augment``: one of ``AUGMENTATIONS``; True is "crop-flip", False the plain crop). Pixels
    are cut later, batch-wise (``cut_crops``); a crop-sample carries its decoded ``source``
    image until then.

    The pad-and-crop shift scales with the image (``pipeline.features.crops.pad_for``)."""
    mode = {True: "crop-flip", False: "none"}.get(augment, augment)
    for s in src:
        image = s["image"]
        h, w = image.shape[-2:]
        for _ in range(candidates):
            crop = sample_crop(rng, h, w, augment=mode) if mode != "none" else plain_crop(h, w)
            yield {"index": s["index"], "label": s["label"], "crop": crop, "crop_id": -1,
                   "source": image}


def cut_crops(sources: list[torch.Tensor], crops: list[Crop],
              out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Pixels of ``crops`` cut from ``sources``: uint8 ``(B, C, h, w)``, equal to stacking
    ``apply_crop(source, crop, out_size)`` (tests check this).

    When every source has one shape and every crop one size (the pad-and-crop regime of small
    images), the whole batch is cut by one gather: a strided view of the zero-padded stack
    enumerates every window position, indexed by (top, left) per sample; flipped rows are
    mirrored in one more batch op. About 5x faster than ``apply_crop`` per sample. Otherwise
    each crop goes through ``apply_crop``.
    """
    shapes = {tuple(s.shape) for s in sources}
    sizes = {(c.height, c.width) for c in crops}
    if len(shapes) != 1 or len(sizes) != 1 or (out_size is not None and tuple(out_size) not in sizes):
        return torch.stack([apply_crop(s, c, out_size) for s, c in zip(sources, crops)])
    (_, h, w), (ch, cw) = shapes.pop(), sizes.pop()
    top = torch.tensor([c.top for c in crops])
    left = torch.tensor([c.left for c in crops])
    flip = torch.tensor([bool(c.flip) for c in crops])
    pad_t, pad_b = max(0, -int(top.min())), max(0, int((top + ch - h).max()))
    pad_l, pad_r = max(0, -int(left.min())), max(0, int((left + cw - w).max()))
    x = torch.stack(sources)
    if pad_t or pad_b or pad_l or pad_r:
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b))
    b, c, hp, wp = x.shape
    sb, sc, sh, sw = x.stride()
    windows = x.as_strided((b, c, hp - ch + 1, wp - cw + 1, ch, cw), (sb, sc, sh, sw, sh, sw))
    out = windows[torch.arange(b), :, top + pad_t, left + pad_l]  # (B, C, ch, cw), a copy
    if bool(flip.any()):
        out[flip] = out[flip].flip(-1)
    return out


def collate(samples: list[dict[str, Any]], out_size: tuple[int, int] | None = None
            ) -> dict[str, Any]:
    """Stack crop-samples into a batch: ``source`` + ``crop`` -> ``image`` (``cut_crops``),
    ``crop`` -> int64 ``(B, 5)``, other numbers -> 1-D tensors, anything else -> lists."""
    out: dict[str, Any] = {}
    crops = [s["crop"] for s in samples]
    out["image"] = cut_crops([s["source"] for s in samples], crops, out_size)
    out["crop"] = torch.tensor([tuple(int(v) for v in c) for c in crops], dtype=torch.int64)
    for k, v in samples[0].items():
        if k in ("source", "crop", "image"):
            continue
        vals = [s[k] for s in samples]
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(v, (float, np.floating)):
            out[k] = torch.tensor(np.asarray(vals, dtype=np.float32))
        elif isinstance(v, (bool, int, np.integer)):
            out[k] = torch.tensor(np.asarray(vals, dtype=np.int64))
        else:
            out[k] = vals
    return out


def batch_samples(src: Iterable[dict[str, Any]], *, size: int, partial: bool, skipped: list[str],
                  out_size: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    """Stage: collate ``size`` crop-samples per batch; attach and reset ``skipped`` keys."""
    buf: list[dict[str, Any]] = []
    for s in src:
        buf.append(s)
        if len(buf) == size:
            yield _with_skipped(collate(buf, out_size), skipped)
            buf = []
    if buf and partial:
        yield _with_skipped(collate(buf, out_size), skipped)


def _with_skipped(batch: dict[str, Any], skipped: list[str]) -> dict[str, Any]:
    batch["skipped"] = list(skipped)
    skipped.clear()
    return batch


def filter_batches(src: Iterable[dict[str, Any]], *, batch_filter: BatchFilter,
                   rng: np.random.Generator, size: int) -> Iterator[dict[str, Any]]:
    """Stage: ``batch_filter`` turns each batch of candidates into a batch of ``size``."""
    for batch in src:
        skipped = batch.pop("skipped")
        out = batch_filter(batch, rng=rng, size=size)
        out["skipped"] = skipped
        yield out


# ----------------------------------------------------------------------------- the dataset


class ShardDataset(IterableDataset):
    """Batches of one split of a store for this rank; see the module docstring.

    Args:
        store: store directory.
        split: ``train``, ``val`` or ``test``.
        batch_size: B, crops per output batch.
        train: shuffle, augment, fixed quota of batches per epoch (else: every sample once).
        seed: drives shard order, shuffle buffer and crops (with epoch, rank and worker).
        rank, world_size: this process in DDP (default: from torch.distributed if initialised).
        num_workers: DataLoader workers per rank (0: iterate in the calling process).
        shuffle_buffer: size of the sample shuffle buffer (train only).
        image_size: output side for stores whose images vary in size or are large (RRC).
        candidates_per_image: crop-samples per image before ``batch_filter``.
        crop_stage: replaces ``random_crops`` (same keyword arguments).
        batch_filter: keeps ``batch_size`` of ``batch_size * candidates_per_image`` crops.
    """

    def __init__(self, store: str | os.PathLike, split: str, *, batch_size: int, train: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 2, shuffle_buffer: int = 2000, image_size: int | None = None,
                 candidates_per_image: int = 1, crop_stage: CropStage | None = None,
                 batch_filter: BatchFilter | None = None, skip_damaged: bool = False,
                 choose_first: bool = True, augment: str = "crop-flip") -> None:
        super().__init__()
        if augment not in AUGMENTATIONS:
            raise UsageError(f"unknown augmentation {augment!r}; choose one of "
                             f"{', '.join(AUGMENTATIONS)}")
        self.augment = augment
        self.skip_damaged = bool(skip_damaged)
        self.choose_first = bool(choose_first)
        layout = StoreLayout(store)
        manifest = read_manifest(layout)
        # Size and sha256 travel with each shard: the reader checks them on the bytes it reads.
        self.shards = [Shard(str(i.path), i.count, i.bytes, i.sha256)
                       for i in shard_infos(layout, manifest, split)]
        for s in self.shards:
            if not os.path.isfile(s.path):
                raise StoreError(f"shard {s.path} listed in the manifest is missing; ingest again")
        if batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        if candidates_per_image < 1:
            raise UsageError("candidates_per_image must be >= 1")
        if candidates_per_image > 1 and batch_filter is None:
            raise UsageError("candidates_per_image > 1 needs a batch_filter to keep batch_size crops")
        if rank is None or world_size is None:
            rank, world_size = _dist_info()
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(0, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.candidates = candidates_per_image
        self.crop_stage = crop_stage or random_crops
        self.batch_filter = batch_filter
        self.channels = int(manifest.get("image", {}).get("channels") or 3)
        self.num_samples = sum(s.count for s in self.shards)
        self.out_size = output_size(manifest, image_size)  # the rule build-features uses
        self.image_size = self.out_size[0] if self.out_size else int(manifest["image"]["height"])
        self.epoch = 0
        if train and self.num_samples < world_size * batch_size:
            raise StoreError(
                f"split {split!r} has {self.num_samples} samples, fewer than one batch per rank "
                f"({world_size} x {batch_size}); use a smaller --batch-size"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order and crops of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def steps_per_epoch(self) -> int:
        """Batches per rank per epoch (train: equal on every rank; eval: all samples once)."""
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        plans = [self._plan(w) for w in range(self.workers)]
        return sum(-(-p.count // self.batch_size) for p in plans)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def _plan(self, worker: int, repeat: int = 0) -> WorkerPlan:
        return plan_worker(self.shards, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, worker=worker, num_workers=self.workers,
                           shuffle=self.train, repeat=repeat)

    def _quota(self, worker: int) -> int:
        steps, w = self.steps_per_epoch(), self.workers
        return steps // w + (1 if worker < steps % w else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # torchvision warns on every decode call; once per worker is enough (and costs less).
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
        info = get_worker_info()
        worker = info.id if info is not None else 0
        skipped: list[str] = []
        ident = (self.seed, self.epoch, self.rank, worker)
        crop_rng = np.random.default_rng(seed_ints(*ident, 1))
        filter_rng = np.random.default_rng(seed_ints(*ident, 2))
        if self._chooses_first():
            # Choose, then cut: the kept crops are picked from the stored tau of the 2B
            # candidates before any pixel is read, and only their images are decoded.
            batches = self.crop_stage.choose_first(
                self._samples(worker, skipped, decode=False), crop_rng=crop_rng,
                filter_rng=filter_rng, size=self.batch_size, candidates=self.candidates,
                channels=self.channels, out_size=self.out_size, skipped=skipped)
        else:
            samples = self._samples(worker, skipped)
            crops = self.crop_stage(samples, rng=crop_rng, candidates=self.candidates,
                                    augment=self.augment if self.train else "none")
            batches = batch_samples(crops, size=self.batch_size * self.candidates,
                                    partial=not self.train, skipped=skipped, out_size=self.out_size)
            if self.batch_filter is not None:
                batches = filter_batches(batches, batch_filter=self.batch_filter, rng=filter_rng,
                                         size=self.batch_size)
        if not self.train:
            yield from batches
            return
        # with_epoch: exactly this worker's quota; the pass generator restarts as needed.
        quota = self._quota(worker)
        if quota > 0:
            yield from itertools.islice(batches, quota)

    def _chooses_first(self) -> bool:
        """The crop stage can choose before decoding, with exactly this batch filter's rule."""
        return (self.train and self.choose_first and self.batch_filter is not None
                and getattr(self.crop_stage, "chooses_first_with", None) is self.batch_filter)

    def _samples(self, worker: int, skipped: list[str], decode: bool = True) -> Iterator[dict[str, Any]]:
        reported: set[str] = set()

        def one_pass(repeat: int) -> Iterator[dict[str, Any]]:
            plan = self._plan(worker, repeat)
            raw = read_shards(plan.shards, errors=skipped,
                              damaged=functools.partial(is_damaged, channels=self.channels),
                              skip_damaged=self.skip_damaged, stride=plan.stride, offset=plan.offset,
                              reported=reported)
            raw = take_every(raw, stride=plan.stride, offset=plan.offset)
            if self.train and self.shuffle_buffer > 1:
                rng = python_rng(self.seed, self.epoch, self.rank, worker, repeat, 3)
                raw = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                          rng=rng)(raw)
            if not decode:
                return undecoded_samples(raw, skipped=skipped)
            return decode_samples(raw, channels=self.channels, skipped=skipped)

        if not self.train:
            yield from one_pass(0)
            return
        repeat = 0
        while True:
            got = 0
            for s in one_pass(repeat):
                got += 1
                yield s
            if got == 0:
                raise StoreError(f"worker {worker} of rank {self.rank} found no readable samples "
                                 f"in split {self.split!r}; the shards are damaged, ingest again")
            repeat += 1


def _dist_info() -> tuple[int, int]:
    from swift_sampler.pipeline.process_group import rank_and_world

    return rank_and_world()


def create_loader(store: str | os.PathLike, split: str, *, batch_size: int, train: bool = True,
                  num_workers: int = 2, pin_memory: bool = False, **kwargs: Any
                  ) -> tuple[DataLoader, ShardDataset]:
    """A ``DataLoader`` over ``ShardDataset`` (batches come ready from the workers).

    Workers are not persistent: each ``iter(loader)`` forks them afresh, so they see the epoch
    set by ``dataset.set_epoch`` just before. Returns ``(loader, dataset)``.
    """
    ds = ShardDataset(store, split, batch_size=batch_size, train=train, num_workers=num_workers,
                      **kwargs)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=4 if num_workers > 0 else None)
    return loader, ds

