"""Checkpoints: one plain dict saved with ``torch.save`` through an atomic writer.

Keys: ``model`` (state dict), ``model_name``, ``num_classes``, ``in_chans``, ``image_size``,
``epoch`` (last finished epoch, 0-based), ``optimizer`` (state dict), ``sched`` (schedule name
and step counter), ``rng`` (torch CPU generator state), ``store_id``, ``classes`` (the store's class names), ``config`` (resolved run
configuration, JSON-able), ``dynamics`` (``train.dynamics`` state, named runs). Only tensors,
numbers, strings, lists and dicts, so loading works with ``torch.load(weights_only=True)``: a
checkpoint never runs code.

A checkpoint is written whole or not at all (temp file + rename): a crash mid-write leaves the
previous epoch's checkpoint in place, which is what ``--resume`` and the NaN guard rely on.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swift_sampler.storage import StoreError, atomic_writer

from .models import Classifier, create_model

REQUIRED = ("model", "model_name", "num_classes", "in_chans", "image_size")


class CheckpointError(StoreError):
    """A checkpoint is missing, unreadable or does not fit what it is used for."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Write ``model`` (unwrapped from DDP) and ``extra`` fields atomically to ``path``."""
    bare = unwrap(model)
    state = {
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "model_name": bare.model_name,
        "num_classes": bare.num_classes,
        "in_chans": bare.in_chans,
        "image_size": bare.image_size,
        **extra,
    }
    with atomic_writer(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU (``weights_only=True``); raise ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a write was cut off; "
                              "train again (or --resume) to write it anew")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a checkpoint of this "
                              "project (not a torch.save archive); pass the checkpoint.pt of a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A whole archive holding more than tensors and plain data. Not torch's own advice:
        # weights_only=False would run whatever code the pickle carries.
        raise CheckpointError(f"cannot read checkpoint {path}: it holds objects other than "
                              "tensors and plain data, and loading them could run code; it is "
                              "not a checkpoint of this project") from None
    except Exception:  # a zip that does not read back whole: cut short or damaged
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or damaged "
                              f"({size} bytes); train again (or --resume) to write it anew") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(
            f"{path} is not a swift-sampler checkpoint (needs keys {', '.join(REQUIRED)})"
        )
    return ckpt


def load_weights(model: nn.Module, ckpt: dict[str, Any], *, where: str = "checkpoint") -> None:
    """Copy ``ckpt['model']`` into ``model`` after checking architecture and class count."""
    bare = unwrap(model)
    if ckpt["model_name"] != bare.model_name:
        raise CheckpointError(
            f"{where} holds a {ckpt['model_name']!r} model but the run uses {bare.model_name!r}; "
            "pass the matching --model (or leave --model out to take the checkpoint's)"
        )
    if int(ckpt["num_classes"]) != bare.num_classes or int(ckpt["in_chans"]) != bare.in_chans:
        raise CheckpointError(
            f"{where} was trained for {ckpt['num_classes']} classes x {ckpt['in_chans']} channels "
            f"but this store has {bare.num_classes} classes x {bare.in_chans} channels; "
            "use a checkpoint trained on a store with the same classes"
        )
    try:
        bare.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{where} does not fit the {bare.model_name!r} architecture: {str(e).splitlines()[0]}"
        ) from None


def check_classes(meta: dict[str, Any], manifest: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint trained on other classes than the store's (by name and order).

    Checkpoints record the class names of the store they were trained on; a store with as many
    classes but others (or in another order) would be scored silently wrong. Checkpoints
    written before the names were recorded are checked by count only, where they are used.
    """
    trained = meta.get("classes")
    if trained is not None and list(trained) != list(manifest["classes"]):
        have = ", ".join(manifest["classes"][:5]) + (" ..." if len(manifest["classes"]) > 5 else "")
        was = ", ".join(list(trained)[:5]) + (" ..." if len(trained) > 5 else "")
        raise CheckpointError(f"{where} was trained on the classes {was}, but this store has "
                              f"{have}; use a checkpoint trained on a store with these classes")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint.

    Returns:
        ``(model, meta)``: the model in eval mode on ``device``, and the checkpoint dict without
        its ``model``/``optimizer`` tensors (``model_name``, ``num_classes``, ``epoch``,
        ``store_id``, ``config`` ...).
    """
    ckpt = load_checkpoint(path)
    model = create_model(ckpt["model_name"], int(ckpt["num_classes"]), int(ckpt["in_chans"]),
                         int(ckpt["image_size"]))
    load_weights(model, ckpt, where=str(path))
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "dynamics")}
    return model.to(device).eval(), meta
