"""Crops as explicit values, so any training crop can be replayed exactly later.

A crop is ``(top, left, height, width, flip)`` in the coordinates of the decoded source image.
The window may reach outside the image (pad-and-crop augmentation); pixels outside are zero.
``apply_crop`` is the one function that turns an image and a crop into pixels: the loader,
build-features and the sampler stage all call it, which is what makes replay exact.

Policies (chosen from the image size, as is usual for each regime):
- ``pad``: small images (<= 64 px): pad by ``padding`` then take a random window of the
  image's own size, plus a horizontal flip. The padding scales with the image
  (``pad_for``): CIFAR's 4 pixels at 32 px, 1 pixel at 8 px, where 4 would push half a
  digit out of view.
- ``rrc``: larger images: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3), plus a flip;
  the window is resized to ``out_size``.
Crop 0 of every image in the feature store is the plain view (``plain_crop``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

SMALL_IMAGE = 64


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_policy(height: int, width: int) -> str:
    return "pad" if max(height, width) <= SMALL_IMAGE else "rrc"


def plain_crop(height: int, width: int) -> Crop:
    """The un-augmented view: the whole small image, or the central square of a large one."""
    if crop_policy(height, width) == "pad":
        return Crop(0, 0, height, width, False)
    side = min(height, width)
    return Crop((height - side) // 2, (width - side) // 2, side, side, False)


def pad_for(side: int) -> int:
    """Pad-and-crop shift for a small image of side ``side`` (4 at 32 px, as for CIFAR)."""
    return max(1, round(side / 8))


# Training augmentations: a random crop (pad-and-crop for small images, random-resized for
# large ones) and a horizontal flip, either alone, or none (the plain view).
AUGMENTATIONS = ("crop-flip", "crop", "flip", "none")


def sample_crop(rng: np.random.Generator, height: int, width: int, *, padding: int | None = None,
                augment: str = "crop-flip") -> Crop:
    """Draw one training crop for an image of ``height`` x ``width`` from ``rng``.

    ``augment`` (``AUGMENTATIONS``): "crop" never flips (digits and text must not be
    mirrored), "flip" keeps the plain window. Every mode but "none" draws the flip first, so a
    mode changes the crops it makes and nothing else in the stream of draws.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return plain_crop(height, width)
    if padding is None:
        padding = pad_for(min(height, width))
    flip = bool(rng.integers(2)) and augment != "crop"
    if augment == "flip":
        return plain_crop(height, width)._replace(flip=flip)
    if crop_policy(height, width) == "pad":
        top = int(rng.integers(-padding, padding + 1))
        left = int(rng.integers(-padding, padding + 1))
        return Crop(top, left, height, width, flip)
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return Crop(top, left, h, w, flip)
    return plain_crop(height, width)._replace(flip=flip)


# dtypes whose CPU tensors share memory with a NumPy array (not bfloat16).
_NUMPY_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.float32, torch.float64})


def apply_crop(image: torch.Tensor, crop: Crop, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Cut ``crop`` out of ``image`` (uint8 or float, shape (C, H, W)).

    Returns a new contiguous tensor of ``image``'s dtype and device, shape (C, crop.height,
    crop.width), or (C, *out_size) when ``out_size`` differs from the window (bilinear,
    antialiased; the flip comes after resizing). Pixels outside the image are zero.
    """
    _, h, w = image.shape
    top, left, ch, cw, flip = crop
    resize = out_size is not None and tuple(out_size) != (ch, cw)
    if not resize and image.device.type == "cpu" and image.dtype in _NUMPY_DTYPES \
            and not image.requires_grad:
        return _window(image, top, left, ch, cw, flip)
    out = image
    if top < 0 or left < 0 or top + ch > h or left + cw > w:
        pad_t, pad_l = max(0, -top), max(0, -left)
        pad_b, pad_r = max(0, top + ch - h), max(0, left + cw - w)
        out = F.pad(out, (pad_l, pad_r, pad_t, pad_b))
        top, left = top + pad_t, left + pad_l
    out = out[:, top : top + ch, left : left + cw]
    if resize:
        dtype = out.dtype
        x = out.unsqueeze(0).float()
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False, antialias=True)
        out = x.squeeze(0).round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else x.squeeze(0).to(dtype)
    if flip:
        out = out.flip(-1)
    return out.contiguous()


def _window(image: torch.Tensor, top: int, left: int, ch: int, cw: int, flip: bool) -> torch.Tensor:
    """The fast path of ``apply_crop`` without resizing, for CPU tensors: zeros of the output
    shape, then one copy of the part of the window inside the image (mirrored when ``flip``).

    Done in NumPy: per call it costs a third of padding the whole image (``F.pad``), slicing
    and flipping in torch, whose per-op overhead dominates at 32 x 32. Pad crops of small
    images (the loader's and build-features' common case) mostly reach outside the image.
    """
    a = image.numpy()
    _, h, w = a.shape
    out = np.zeros((a.shape[0], ch, cw), dtype=a.dtype)
    r0, r1 = max(top, 0), min(top + ch, h)
    c0, c1 = max(left, 0), min(left + cw, w)
    if r1 > r0 and c1 > c0:
        src = a[:, r0:r1, c0:c1]
        d0, d1 = c0 - left, c1 - left  # output columns of the source columns, unflipped
        if flip:  # output column j shows window column cw - 1 - j
            src, d0, d1 = src[:, :, ::-1], cw - d1, cw - d0
        out[:, r0 - top : r1 - top, d0:d1] = src
    return torch.from_numpy(out)
