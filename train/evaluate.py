"""Evaluation: logits over a split, top-1/top-5, and noise diagnostics.

``predict`` runs a model over every sample of a split once (plain crop, store order) and
returns logits by sample index; the cleanlab peer and feature code can use it directly.

Noise diagnostics (accuracy on the clean and on the flipped samples) look up the ground truth
of ``samples.parquet`` by index, here and only here: the loader never reads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from swift_sampler.storage import StoreError, StoreLayout, literal, read_manifest, read_view
from swift_sampler.storage.arguments import check_call

from .checkpoint import CheckpointError, check_classes, load_model, unwrap
from .distributed import pick_device
from .loader import create_loader
from .models import classifier_for_store


@torch.no_grad()
def predict_batches(model: nn.Module, loader, device: torch.device, *, amp: bool | None = None,
                    features: bool = False, progress: str | None = None,
                    total: int | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` (eval mode) over ``loader``; concatenate ``index``, ``label``, ``logits``
    (float32 ``(N, C)``) and, with ``features``, the penultimate ``features`` ``(N, D)``.
    ``progress``: the label of a tqdm bar over the ``total`` samples (None: no bar)."""
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    amp = device.type == "cuda" if amp is None else amp
    out: dict[str, list] = {"index": [], "label": [], "logits": []}
    if features:
        out["features"] = []
    bar = tqdm(total=total, desc=progress, unit="img", disable=progress is None, leave=False)
    for batch in loader:
        bar.update(len(batch["index"]))
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            h = bare.features(x)
            logits = bare.head(h)
        out["index"].append(batch["index"].numpy())
        out["label"].append(batch["label"].numpy())
        out["logits"].append(logits.float().cpu().numpy())
        if features:
            out["features"].append(h.float().cpu().numpy())
    bar.close()
    bare.train(was_training)
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}

log = logging.getLogger(__name__)


def predict(store: str | os.PathLike, model: nn.Module, split: str = "test", *,
            batch_size: int = 512, workers: int = 2, device: str | torch.device | None = None,
            features: bool = False, skip_damaged: bool = False,
            progress: bool = False) -> dict[str, np.ndarray]:
    """Logits of ``model`` for every sample of ``split``, sorted by sample index (``progress``:
    a bar over the samples).

    Returns:
        ``index`` int64 ``(N,)``, ``label`` int64 ``(N,)`` (the training label), ``logits``
        float32 ``(N, C)``, and ``features`` float32 ``(N, D)`` when asked.
    """
    # One check for every command: an unknown device or a GPU the machine lacks is named.
    device = pick_device(str(device) if device is not None else None)
    model = model.to(device)
    loader, _ = create_loader(store, split, batch_size=batch_size, train=False,
                              num_workers=workers, rank=0, world_size=1,
                              image_size=unwrap(model).image_size, skip_damaged=skip_damaged)
    total = (read_manifest(StoreLayout(store))["splits"].get(split) or {}).get("count")
    out = predict_batches(model, loader, device, features=features, total=total,
                          progress=f"{split} ({Path(str(store)).name})" if progress else None)
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``(N,)``: the label is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def noise_diagnostics(store: str | os.PathLike, split: str, index: np.ndarray,
                      pred: np.ndarray | None = None) -> dict[str, Any] | None:
    """Diagnostics only: how ``index`` (and predictions ``pred``) relate to injected noise.

    Returns ``None`` when the split carries no noise ground truth; else ``flipped_share`` (share
    of ``index`` whose label was flipped) and, given ``pred``, ``clean_accuracy`` (prediction ==
    label on clean samples), ``flipped_true_accuracy`` (prediction == original label on flipped
    samples) and ``flipped_memorised`` (prediction == the flipped label).
    """
    layout = StoreLayout(store)
    if not layout.samples.is_file():
        return None
    table = read_view(layout.root, "samples", ["index", "label", "true_label", "noisy"],
                      where=f"split = {literal(split)}")
    noisy_col = table.column("noisy").to_numpy(zero_copy_only=False)
    if len(noisy_col) == 0 or not noisy_col.any():
        return None
    order = table.column("index").to_numpy()
    n = int(order.max()) + 1
    noisy = np.zeros(n, bool)
    true = np.zeros(n, np.int64)
    label = np.zeros(n, np.int64)
    noisy[order] = noisy_col
    true[order] = table.column("true_label").to_numpy()
    label[order] = table.column("label").to_numpy()
    flipped = noisy[index]
    out: dict[str, Any] = {"flipped_share": float(flipped.mean()) if len(index) else 0.0,
                           "n_clean": int((~flipped).sum()), "n_flipped": int(flipped.sum())}
    if pred is not None:
        ok_clean = pred[~flipped] == label[index][~flipped]
        out["clean_accuracy"] = float(ok_clean.mean()) if len(ok_clean) else None
        fl = index[flipped]
        out["flipped_true_accuracy"] = float((pred[flipped] == true[fl]).mean()) if len(fl) else None
        out["flipped_memorised"] = float((pred[flipped] == label[fl]).mean()) if len(fl) else None
    return out


def evaluate(store: str | os.PathLike, checkpoint_or_model: str | os.PathLike | nn.Module,
             split: str = "test", *, batch_size: int = 512, workers: int = 2,
             device: str | torch.device | None = None, skip_damaged: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Top-1 (and top-5 when C > 5) accuracy and mean loss of a model on ``split``; with noise
    ground truth in the store, accuracy on the clean and on the flipped samples of that split.

    A damaged shard stops it (``ShardReadError``) unless ``skip_damaged``; then ``lost`` counts
    the samples of the split that were not scored.

    Args:
        checkpoint_or_model: a checkpoint file, or a model: one of ``train.models`` or any
            ``nn.Module`` whose last ``nn.Linear`` is its head (a torchvision or timm network,
            your own), which gets pixels in [0, 1] normalised as ``train.models.as_classifier``
            says.

    Raises:
        CheckpointError: the checkpoint's classes or channels do not match the store.
        UsageError: a model that ``as_classifier`` cannot take (it says why).
    """
    check_call(evaluate, locals())
    layout = StoreLayout(store)
    manifest = read_manifest(layout)
    if isinstance(checkpoint_or_model, nn.Module):
        # A model built elsewhere (torchvision, timm, the user's own) gets the interface here.
        model, source = classifier_for_store(unwrap(checkpoint_or_model), manifest), "model"
    else:
        model, meta = load_model(checkpoint_or_model)
        source = str(checkpoint_or_model)
        check_classes(meta, manifest, source)
        if meta.get("store_id") not in (None, manifest["store_id"]):
            log.warning("%s was trained on another store (store_id %s, this store %s); "
                        "evaluating it anyway", source, meta.get("store_id"), manifest["store_id"])
    bare = unwrap(model)
    classes = len(manifest["classes"])
    channels = int(manifest.get("image", {}).get("channels") or 3)
    if bare.num_classes != classes or bare.in_chans != channels:
        raise CheckpointError(
            f"{source} predicts {bare.num_classes} classes from {bare.in_chans} channels but the "
            f"store has {classes} classes and {channels} channels"
        )
    if split not in manifest["splits"] or not manifest["splits"][split].get("shards"):
        raise StoreError(f"store {layout.root} has no {split!r} split to evaluate")
    out = predict(store, model, split, batch_size=batch_size, workers=workers, device=device,
                  skip_damaged=skip_damaged, progress=progress)
    logits, labels = out["logits"], out["label"]
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    pred = logits.argmax(1)
    listed = int(manifest["splits"][split].get("count") or len(labels))
    result: dict[str, Any] = {"split": split, "count": int(len(labels)), "lost": listed - int(len(labels)),
                              "top1": float((pred == labels).mean()), "loss": float(loss)}
    if classes > 5:
        result["top5"] = float(topk_correct(logits, labels, 5).mean())
    diag = noise_diagnostics(store, split, out["index"], pred)
    if diag is not None:
        result["noise"] = diag
    return result
