"""Decode stored image bytes to uint8 tensors (C, H, W), the form every stage works in."""

from __future__ import annotations

import warnings

import torch
from torchvision.io import ImageReadMode, decode_image

from swift_sampler.storage.errors import SwiftSamplerError

# torchvision warns about its decoders' future on every call; the warning costs ~10 us a sample.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")

_MODES = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}


class CorruptSampleError(SwiftSamplerError, ValueError):
    """Stored bytes are not a decodable image."""


def decode(data: bytes, channels: int = 3) -> torch.Tensor:
    """Decode JPEG or PNG ``data`` to a uint8 tensor of shape (channels, H, W).

    Raises ``CorruptSampleError`` for bytes that are not a valid image, so callers can count
    and skip the sample instead of crashing mid-epoch.
    """
    if not data:
        raise CorruptSampleError("empty image bytes")
    try:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_image(buf, mode=_MODES[channels])
    except (RuntimeError, ValueError) as e:
        raise CorruptSampleError(f"cannot decode image: {str(e).splitlines()[0]}") from None
