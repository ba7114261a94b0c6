"""Crops as explicit values, so any training crop can be replayed exactly later.

A crop is ``(top, left, height, width, flip)`` in the coordinates of the decoded source image.
The window may reach outside the image (pad-and-crop augmentation); pixels outside are zero.
``apply_crop`` is the one function that turns an image and a crop into pixels: the loader,
build-features and the sampler stage all call it, which is what makes replay exact.

Policies (chosen from the image size, as is usual for each regime):
- ``pad``: small images (<= 64 px): pad by ``padding`` then take a random window of the
  image's own size (CIFAR's pad-4 random crop), plus a horizontal flip.
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


def sample_crop(rng: np.random.Generator, height: int, width: int, *, padding: int = 4) -> Crop:
    """Draw one training crop for an image of ``height`` x ``width`` from ``rng``."""
    flip = bool(rng.integers(2))
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


def apply_crop(image: torch.Tensor, crop: Crop, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Cut ``crop`` out of ``image`` (uint8 or float, shape (C, H, W)).

    Returns shape (C, crop.height, crop.width), or (C, *out_size) when ``out_size`` differs from
    the window (bilinear, antialiased). Pixels outside the image are zero.
    """
    c, h, w = image.shape
    top, left, ch, cw, flip = crop
    out = image
    if top < 0 or left < 0 or top + ch > h or left + cw > w:
        pad_t, pad_l = max(0, -top), max(0, -left)
        pad_b, pad_r = max(0, top + ch - h), max(0, left + cw - w)
        out = F.pad(out, (pad_l, pad_r, pad_t, pad_b))
        top, left = top + pad_t, left + pad_l
    out = out[:, top : top + ch, left : left + cw]
    if out_size is not None and tuple(out_size) != (ch, cw):
        dtype = out.dtype
        x = out.unsqueeze(0).float()
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False, antialias=True)
        out = x.squeeze(0).round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else x.squeeze(0).to(dtype)
    if flip:
        out = out.flip(-1)
    return out.contiguous()
