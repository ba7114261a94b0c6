"""Image sources for ingest: ``imagefolder:DIR``, ``digits`` and ``torchvision:cifar10|cifar100``.

A source is a list of ``Item`` (name, clean label, and a way to get the encoded bytes) plus
the class names. Bytes are what the store keeps: an image folder's JPEG or PNG files are
copied as they are (never re-encoded); sources held as arrays (digits, torchvision's CIFAR
pickles) are encoded once as lossless PNG.

``probe`` checks that bytes are a whole, decodable JPEG or PNG and reports its format and
shape; ingest calls it on every item so a corrupt file is skipped and named, never kept.
"""

from __future__ import annotations

import io
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from swift_sampler.storage.errors import SwiftSamplerError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TORCHVISION_SETS = ("cifar10", "cifar100")
_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}


class SourceError(SwiftSamplerError, ValueError):
    """A source spec or folder that cannot be ingested; the message says what to do."""


class CorruptImageError(SwiftSamplerError, ValueError):
    """Bytes that are not a whole JPEG or PNG image."""


class ImageInfo(NamedTuple):
    ext: str  # "jpg" or "png"
    channels: int  # channels as stored: 1 (gray), 2 (gray+alpha), 3 or 4
    height: int
    width: int


class Item(NamedTuple):
    """One source image: ``name`` (relative path or id), clean ``label``, file path or bytes."""

    name: str
    label: int
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            return f.read()


@dataclass
class Source:
    spec: str
    classes: list[str]
    items: list[Item]

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((it.label for it in self.items), dtype=np.int64, count=len(self.items))


def open_source(spec: str, *, split: str = "train", labels: str | os.PathLike | None = None) -> Source:
    """Resolve a source spec to its class names and items (nothing is decoded yet).

    ``torchvision:NAME`` gives the set's training part; ``torchvision:NAME:test`` its test part.
    ``labels`` (a label file) is what a flat image folder takes its classes and labels from.
    """
    kind, _, arg = spec.partition(":")
    if kind == "imagefolder":
        return imagefolder(arg, spec=spec, labels=labels)
    if kind == "digits" and not arg:
        return digits()
    if kind == "torchvision":
        name, _, part = arg.partition(":")
        return torchvision_set(name, train=(part or split) != "test")
    raise SourceError(f"unknown source {spec!r}: use imagefolder:DIR, digits or "
                      "torchvision:cifar10|cifar100")


def imagefolder(folder: str | os.PathLike, *, spec: str | None = None,
                labels: str | os.PathLike | None = None) -> Source:
    """One subfolder per class (sorted names become labels 0..C-1); every file is an item.

    A flat folder (files, no class subfolders) needs ``labels``, a label file: its sorted
    class names become labels 0..C-1 and each file's row gives its label.
    """
    root = Path(folder).expanduser()
    if not str(folder):
        raise SourceError("imagefolder: needs a folder, e.g. imagefolder:data/train")
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist (or is not a folder)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        return _flat_folder(root, spec or f"imagefolder:{root}", labels)
    items = []
    for label, name in enumerate(classes):
        # Plain strings, not Path objects: listing 50,000 files is otherwise a visible cost.
        with os.scandir(root / name) as entries:
            files = sorted((e.name, e.path) for e in entries if e.is_file())
        items += [Item(f"{name}/{f}", label, path) for f, path in files]
    if not items:
        raise SourceError(f"source folder {root} holds no files in its class subfolders "
                          f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return Source(spec or f"imagefolder:{root}", classes, items)


def _flat_folder(root: Path, spec: str, labels: str | os.PathLike | None) -> Source:
    from .label_file import LabelFileError, read_label_rows

    with os.scandir(root) as entries:
        files = sorted((e.name, e.path) for e in entries
                       if e.is_file() and not e.name.startswith("."))
    if not files:
        raise SourceError(f"source folder {root} has no class subfolders and no images; expected "
                          f"{root}/<class>/<image>, or images with a label file (--labels FILE)")
    if labels is None:
        raise SourceError(f"source folder {root} has images but no class subfolders: give their "
                          "labels in a file `path,label` (--labels FILE, labels=FILE from Python), "
                          f"or sort them into {root}/<class>/<image>")
    label_of = dict(read_label_rows(labels))
    classes = sorted(set(label_of.values()))
    if len(classes) < 2:
        raise LabelFileError(f"--labels {labels} names {len(classes)} class(es); a classifier "
                             "needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    missing = [name for name, _ in files if name not in label_of]
    if missing:  # read_label_file names the rest (unknown or repeated paths)
        raise LabelFileError(f"--labels {labels} has no row for {len(missing)} image(s) of the "
                             f"source (e.g. {missing[0]!r}); every image needs a label: add the "
                             "rows, or leave the unlabelled images out of the source folder")
    return Source(spec, classes, [Item(name, index[label_of[name]], path) for name, path in files])


def digits() -> Source:
    """scikit-learn's embedded 8x8 digits (1,797 images), 0..16 scaled to 0..255, gray PNG."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    items = [Item(f"digits:{i}", int(y), data=encode_png(img))
             for i, (img, y) in enumerate(zip(pixels, d.target))]
    return Source("digits", [str(c) for c in d.target_names], items)


def torchvision_set(name: str, *, train: bool = True, root: str | os.PathLike | None = None
                    ) -> Source:
    """CIFAR-10/100 through torchvision, downloaded to ``root`` (``$SWIFT_SAMPLER_DATA`` or
    ``~/.cache/swift-sampler``) when missing. Offline, fails within seconds."""
    if name not in TORCHVISION_SETS:
        raise SourceError(f"unknown torchvision set {name!r}: use one of {', '.join(TORCHVISION_SETS)}")
    import torchvision

    root = Path(root or os.environ.get("SWIFT_SAMPLER_DATA", "~/.cache/swift-sampler")).expanduser()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        _require_online(_HOSTS[name], name)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # a stalled download fails instead of hanging forever
        try:
            ds = cls(str(root), train=train, download=True)
        except OSError as e:
            raise SourceError(f"download of {name} failed ({e}); check the network or place "
                              f"the dataset under {root}") from None
        finally:
            socket.setdefaulttimeout(old)
    part = "train" if train else "test"
    items = [Item(f"{name}:{part}:{i}", int(y), data=encode_png(img))
             for i, (img, y) in enumerate(zip(ds.data, ds.targets))]
    return Source(f"torchvision:{name}" + ("" if train else ":test"), list(ds.classes), items)


def _require_online(host: str, name: str, timeout: float = 3.0) -> None:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise SourceError(f"cannot download {name}: {host} is unreachable ({e}). Offline, use "
                          "--source digits or imagefolder:DIR, or place the dataset under "
                          "$SWIFT_SAMPLER_DATA") from None


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array -> PNG bytes (lossless)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def probe(data: bytes) -> ImageInfo:
    """Decode ``data`` fully (a truncated file fails) and return its format and shape.

    Raises:
        CorruptImageError: not a JPEG/PNG, or not decodable.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image

    if data.startswith(JPEG_MAGIC):
        ext = "jpg"
    elif data.startswith(PNG_MAGIC):
        ext = "png"
    else:
        raise CorruptImageError("not a JPEG or PNG file" if data else "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = reason.rsplit(", ", 1)[-1] if "csrc" in reason else reason  # drop C++ location
        raise CorruptImageError(f"cannot decode {ext.upper()}: {reason[:200]}") from None
    c, h, w = img.shape
    return ImageInfo(ext, int(c), int(h), int(w))
