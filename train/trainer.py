"""The training loop (after nanoGPT's ``train.py``: read it top to bottom).

``train(config) -> summary`` trains a model on a store's train split and, when the config has a
``name``, writes ``STORE/runs/NAME/``: ``config.json`` (resolved configuration), ``metrics.jsonl``
(one line per epoch), ``checkpoint.pt`` (atomic, every epoch) and ``summary.json``. ``fit``
returns the model as well. Under torchrun every rank trains (DDP) and rank 0 alone writes.

Determinism (CPU): the model is initialised from ``seed``; crops and order come from
``(seed, epoch, rank, worker)``; the learning rate is a pure function of progress. Resuming
from the checkpoint of epoch ``e`` therefore continues exactly as if never stopped, and the
final weights equal an uninterrupted run's (tested).

A non-finite loss stops the run with ``TrainingDiverged``: the checkpoint of the last good
epoch stays in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from swift_sampler.storage import (
    StoreError,
    StoreLayout,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    exclusive_lock,
    read_manifest,
    remove_stale_temporaries,
)
from swift_sampler.storage.errors import SwiftSamplerError, UsageError

from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, average_buffers, barrier, init_distributed
from .dynamics import TrainingDynamics
from .evaluate import noise_diagnostics, predict_batches
from .loader import BatchFilter, CropStage, create_loader
from .models import create_model
from .presets import TrainConfig
from .schedules import lr_at

log = logging.getLogger(__name__)
DYNAMICS_FILE = "dynamics.parquet"


class TrainingDiverged(SwiftSamplerError, ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class SamplerHook:
    """How a sampler enters the loop: loader stages plus a per-epoch diagnostic.

    ``candidates_per_image`` crop-samples per image, chosen by ``crop_stage`` (None: random
    crops) and reduced to the batch size by ``batch_filter`` inside the loader workers.
    ``step_filter(batch) -> batch`` runs in the training process instead, before the step
    (the ``online`` mode, which needs a forward pass of a frozen model, on the GPU when present).
    A filter may set ``batch["candidates"]`` (int, crops it chose from) so that the epoch's
    ``kept_fraction`` can be logged.
    """

    candidates_per_image: int = 2
    crop_stage: CropStage | None = None
    batch_filter: BatchFilter | None = None
    step_filter: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    describe: dict[str, Any] | None = None  # recorded in config.json


@dataclass
class FitResult:
    model: nn.Module
    summary: dict[str, Any]


def train(config: TrainConfig, *, sampler: SamplerHook | None = None,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; return the summary dict (also ``summary.json``)."""
    return fit(config, sampler=sampler, on_epoch_end=on_epoch_end).summary


def fit(config: TrainConfig, *, sampler: SamplerHook | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """``train``, returning the trained model (unwrapped, on its device) with the summary.

    Args:
        config: resolved ``TrainConfig``.
        sampler: optional sampler stage (``SamplerHook``); None trains with uniform sampling.
        on_epoch_end: called on every rank with each epoch's metrics dict after the checkpoint
            is written (tests use it to interrupt a run).

    Raises:
        StoreError: no train shards, a run folder that exists without ``resume``.
        CheckpointError: ``init`` or the run's checkpoint does not fit the model or store.
        TrainingDiverged: non-finite loss.
    """
    t_start = time.perf_counter()
    dist = init_distributed(config.device)
    device = dist.device
    layout = StoreLayout(config.store)
    manifest = read_manifest(layout)
    image = manifest.get("image", {})
    in_chans = int(image.get("channels") or 3)
    num_classes = len(manifest["classes"])

    if config.pretrained and (config.init or config.continue_from):
        raise UsageError("--pretrained and --init (or continue_from) both choose the starting "
                         "weights: pass one of them")
    init_ckpt = load_checkpoint(config.init) if config.init else None
    continued = load_checkpoint(config.continue_from) if config.continue_from else None
    model_name = config.model
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)

    hook = sampler or SamplerHook(candidates_per_image=1)
    loader, ds = create_loader(
        layout.root, "train", batch_size=config.batch_size, train=True, seed=config.seed,
        rank=dist.rank, world_size=dist.world_size, num_workers=config.workers,
        shuffle_buffer=config.shuffle_buffer, image_size=config.image_size,
        candidates_per_image=hook.candidates_per_image if hook.batch_filter else 1,
        crop_stage=hook.crop_stage, batch_filter=hook.batch_filter,
        pin_memory=device.type == "cuda", skip_damaged=config.skip_damaged,
        augment=config.augment)
    val = _eval_loader(layout, manifest, config.val_split, config, dist, ds.image_size)
    diagnostic = _eval_loader(layout, manifest, config.diagnostic_split, config, dist, ds.image_size)

    # Pretrained weights only start a fresh run: --init, continue_from and a resume bring their own.
    fresh = init_ckpt is None and continued is None and not (
        config.resume and config.name and layout.run(config.name).joinpath("checkpoint.pt").is_file())
    model = create_model(model_name, num_classes, in_chans, ds.image_size,
                         pretrained=config.pretrained and fresh)
    if init_ckpt is not None:
        load_weights(model, init_ckpt, where=f"--init {config.init}")
        if init_ckpt.get("store_id") not in (None, manifest["store_id"]):
            log.warning("--init %s was trained on another store (store_id %s, this store %s); "
                        "fine-tuning from it anyway", config.init, init_ckpt.get("store_id"),
                        manifest["store_id"])
    if continued is not None:
        load_weights(model, continued, where=f"continue_from {config.continue_from}")
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)

    run_dir = layout.run(config.name) if config.name else None
    ckpt_path = run_dir / "checkpoint.pt" if run_dir else None
    start_epoch, history = 0, []
    dynamics = None
    if run_dir is not None and config.record_dynamics:
        dynamics = TrainingDynamics(int(manifest["splits"]["train"]["count"]))
    if continued is not None:
        if "optimizer" not in continued or "epoch" not in continued:
            raise CheckpointError(f"{config.continue_from} holds no optimiser state or epoch; "
                                  "it is not a checkpoint of a training run to continue")
        optimizer.load_state_dict(continued["optimizer"])
        start_epoch = int(continued["epoch"]) + 1
        if start_epoch >= config.epochs:
            raise UsageError(f"{config.continue_from} is of epoch {start_epoch} of the run; "
                             f"nothing is left to train of {config.epochs} epochs")
    if run_dir is not None:
        if ckpt_path.is_file() and not config.resume:
            raise StoreError(f"run {config.name!r} already exists in {layout.root}; pass --resume "
                             "(resume=True from Python) to continue it or choose another name")
        if config.resume and ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("store_id") != manifest["store_id"]:
                raise CheckpointError(f"{ckpt_path} belongs to another store (store_id differs)")
            now = {**config.to_json(), "model": model_name, "image_size": ds.image_size,
                   "world_size": dist.world_size,
                   "sampler": hook.describe if sampler is not None else None}
            check_resumed_recipe(ckpt.get("config") or {}, now, config.name)
            load_weights(model, ckpt, where=str(ckpt_path))
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            start_epoch = int(ckpt["epoch"]) + 1
            history = _read_metrics(run_dir / "metrics.jsonl", before=start_epoch)
            dynamics = _resumed_dynamics(dynamics, ckpt, ckpt_path)

    ddp_model = model
    if dist.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = device.type == "cuda" if config.amp is None else config.amp
    steps = len(loader)
    resolved = {**config.to_json(), "model": model_name, "image_size": ds.image_size,
                "num_classes": num_classes, "in_chans": in_chans, "world_size": dist.world_size,
                "device": str(device), "amp": amp, "steps_per_epoch": steps,
                "store_id": manifest["store_id"],
                "sampler": hook.describe if sampler is not None else None}

    with ExitStack() as stack:
        if run_dir is not None and dist.is_main:
            stack.enter_context(exclusive_lock(layout.lock(f"run-{config.name}"), f"run {config.name}"))
            run_dir.mkdir(parents=True, exist_ok=True)
            # A kill mid-checkpoint leaves a checkpoint-sized temporary; the lock makes it dead.
            remove_stale_temporaries(run_dir, recursive=False)
            atomic_write_json(run_dir / "config.json", resolved)
        metrics: dict[str, Any] = history[-1] if history else {}
        for epoch in range(start_epoch, config.epochs):
            metrics = _train_epoch(ddp_model, loader, ds, optimizer, config, dist, epoch, steps,
                                   amp, hook, dynamics)
            average_buffers(model, dist)
            if dynamics is not None:
                dynamics.end_epoch(epoch, dist)
            if val is not None:
                metrics.update(_validate(model, val, dist, amp))
            if diagnostic is not None:
                metrics.update(_validate(model, diagnostic, dist, amp,
                                         prefix=config.diagnostic_split))
            alarm = exploding_loss(metrics, num_classes, config)
            if alarm:
                metrics["warning"] = alarm
                if dist.is_main:
                    log.warning("%s", alarm)
            history.append(metrics)
            if run_dir is not None and dist.is_main:
                _write_metrics(run_dir / "metrics.jsonl", history)
                if config.save_checkpoints or epoch == config.epochs - 1:
                    save_checkpoint(ckpt_path, model, epoch=epoch, optimizer=optimizer.state_dict(),
                                    sched={"name": config.schedule, "epoch": epoch, "steps": steps},
                                    rng={"torch": torch.get_rng_state()},
                                    store_id=manifest["store_id"],
                                    classes=list(manifest["classes"]), config=resolved,
                                    **({"dynamics": dynamics.state_dict()} if dynamics else {}))
                    _keep_checkpoint(ckpt_path, epoch, config)
                    if config.keep_best and is_best_epoch(history):
                        atomic_write_bytes(best_checkpoint(ckpt_path), ckpt_path.read_bytes())
                    if dynamics is not None:
                        # After the checkpoint that holds its state: never ahead of it.
                        atomic_write_parquet(run_dir / DYNAMICS_FILE, dynamics.table())
            barrier(dist)
            if on_epoch_end is not None:
                on_epoch_end(metrics)
        summary = {
            "command": "train", "run": config.name, "run_dir": str(run_dir) if run_dir else None,
            "checkpoint": str(ckpt_path) if ckpt_path else None, "model": model_name,
            "epochs": config.epochs, "start_epoch": start_epoch, "world_size": dist.world_size,
            "device": str(device), "seconds": round(time.perf_counter() - t_start, 3),
            **{k: metrics.get(k) for k in ("loss", "accuracy", "val_accuracy", "val_loss",
                                           "images_per_s", "kept_fraction", "flipped_kept_share")},
            "skipped": sum(m.get("skipped", 0) for m in history),
            "warnings": [m["warning"] for m in history if m.get("warning")],
            **_best_epoch(history, ckpt_path if config.keep_best else None),
        }
        if run_dir is not None and dist.is_main:
            atomic_write_json(run_dir / "summary.json", summary)
    return FitResult(model.eval(), summary)


def exploding_loss(metrics: dict[str, Any], num_classes: int, config: TrainConfig) -> str | None:
    """A warning when an epoch's mean loss is far above ``ln(C)``, the loss of a uniform guess.

    A network that learns anything is below ``ln(C)`` after its first epoch, even on noisy
    labels; well above it (x1.5 on train, x5 on val) the optimiser is overshooting, the run is
    diverging without a NaN yet, and its result will be poor. Returns None when all is well.
    """
    chance = math.log(max(num_classes, 2))
    loss, val_loss = metrics.get("loss"), metrics.get("val_loss")
    bad = []
    if loss is not None and math.isfinite(loss) and loss > 1.5 * chance:
        bad.append(f"train loss {loss:.2f}")
    if val_loss is not None and math.isfinite(val_loss) and val_loss > 5 * chance:
        bad.append(f"val loss {val_loss:.2f}")
    if not bad:
        return None
    return (f"epoch {metrics.get('epoch', 0) + 1}: {' and '.join(bad)} far above ln({num_classes}) = "
            f"{chance:.2f}, the loss of a uniform guess: the run is diverging; lower --lr (now "
            f"{config.lr:g}) or raise --batch-size (now {config.batch_size}); a small data set "
            "needs a smaller lr than the preset's")


def _keep_checkpoint(ckpt_path: Path, epoch: int, config: TrainConfig) -> None:
    # checkpoint-eNNN.pt after NNN epochs, for the last ``keep_checkpoints`` epochs before the
    # end (the final one is checkpoint.pt itself).
    done = epoch + 1
    if config.keep_checkpoints and config.epochs - config.keep_checkpoints <= done < config.epochs:
        atomic_write_bytes(epoch_checkpoint(ckpt_path, done), ckpt_path.read_bytes())


# What a resumed run must share with the run it continues: the recipe (the global batch, so
# the number of ranks too) and the sampler, not where or how verbosely it runs. The loader
# workers are not in it: another count (another machine) changes the data order from the
# resume on, not the recipe, and is logged.
RESUME_FIELDS = ("model", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                 "schedule", "milestones", "gamma", "warmup", "label_smoothing", "seed",
                 "shuffle_buffer", "image_size", "augment", "init", "world_size",
                 "skip_damaged", "sampler")


def check_resumed_recipe(stored: dict[str, Any], now: dict[str, Any], name: str | None) -> None:
    """Refuse to resume a run with another recipe, naming every field that differs.

    A field the stored config lacks (written before the field existed) counts as its default.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    defaults.update(sampler=None, world_size=1)

    def norm(value: Any) -> Any:
        return json.loads(json.dumps(value))  # tuples and lists alike, as config.json has them

    differ = []
    for key in RESUME_FIELDS:
        old, new = norm(stored.get(key, defaults.get(key))), norm(now.get(key))
        if old != new:
            differ.append(f"{key}: recorded {old!r}, now {new!r}")
    if "workers" in stored and stored["workers"] != now.get("workers"):
        log.warning("run %r resumed with %s loader workers, trained with %s: the data order "
                    "from here on differs from an uninterrupted run's", name, now.get("workers"),
                    stored["workers"])
    if differ:
        hint = (" (pass the same --sampler and sampler options)"
                if any(d.startswith("sampler") for d in differ) else "")
        raise UsageError(f"run {name!r} was trained with another recipe; resuming would change "
                         f"it mid-run: {'; '.join(differ)}{hint}. Resume with the recorded "
                         "settings (runs/NAME/config.json) or start a run of another --name")


def _resumed_dynamics(dynamics: TrainingDynamics | None, ckpt: dict[str, Any],
                      ckpt_path: Path) -> TrainingDynamics | None:
    """The dynamics state of a resumed run, or None when its checkpoint holds none."""
    if dynamics is None:
        return None
    if "dynamics" not in ckpt:
        log.warning("%s holds no training dynamics (written before they were recorded); the "
                    "resumed run records none", ckpt_path)
        return None
    dynamics.load_state_dict(ckpt["dynamics"])
    return dynamics


def best_checkpoint(checkpoint: str | Path) -> Path:
    """Path of the kept checkpoint of the best val epoch of the run of ``checkpoint``."""
    return Path(checkpoint).with_name("checkpoint-best.pt")


def is_best_epoch(history: list[dict[str, Any]]) -> bool:
    """Whether the last epoch of ``history`` has the highest val top-1 so far (the first of
    equals wins: early stopping keeps the earlier of two equal epochs)."""
    scores = [m.get("val_accuracy") for m in history]
    if scores[-1] is None:
        return False
    return all(s is None or s < scores[-1] for s in scores[:-1])


def _best_epoch(history: list[dict[str, Any]], ckpt_path: Path | None) -> dict[str, Any]:
    scored = [m for m in history if m.get("val_accuracy") is not None]
    if not scored:
        return {}
    best = max(scored, key=lambda m: (m["val_accuracy"], -m["epoch"]))
    path = best_checkpoint(ckpt_path) if ckpt_path is not None else None
    return {"best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
            "best_checkpoint": str(path) if path is not None and path.is_file() else None}


def _eval_loader(layout: StoreLayout, manifest: dict[str, Any], split: str | None,
                 config: TrainConfig, dist: DistInfo, image_size: int):
    """A loader over ``split`` in store order, or None when there is no such split."""
    if not split or not manifest["splits"].get(split, {}).get("shards"):
        return None
    loader, _ = create_loader(layout.root, split, batch_size=max(256, config.batch_size),
                              train=False, rank=dist.rank, world_size=dist.world_size,
                              num_workers=min(config.workers, 1), image_size=image_size,
                              pin_memory=dist.device.type == "cuda")
    return loader


def epoch_checkpoint(checkpoint: str | Path, done: int) -> Path:
    """Path of the kept checkpoint after ``done`` epochs of the run of ``checkpoint``."""
    return Path(checkpoint).with_name(f"checkpoint-e{int(done):03d}.pt")


def _train_epoch(model: nn.Module, loader, ds, optimizer, config: TrainConfig, dist: DistInfo,
                 epoch: int, steps: int, amp: bool, hook: SamplerHook,
                 dynamics: TrainingDynamics | None = None) -> dict[str, Any]:
    model.train()
    ds.set_epoch(epoch)
    device = dist.device
    sums = torch.zeros(5, dtype=torch.float64)  # loss*n, correct, n, candidates, skipped
    kept_index: list[np.ndarray] = []
    t0 = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not (config.progress and dist.is_main), dynamic_ncols=True)
    lr = config.lr
    for step, batch in enumerate(bar):
        # The schedule is a pure function of progress in epochs (nanoGPT's get_lr).
        lr = lr_at(epoch + step / steps, schedule=config.schedule, lr=config.lr,
                   epochs=config.epochs, milestones=config.milestones, gamma=config.gamma,
                   warmup=config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hook.step_filter is not None:
            batch = hook.step_filter(batch)
        x = batch["image"].to(device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # One reduce per step decides for every rank at once whether the loss is finite, so no
        # rank stops while another waits in the next gradient all-reduce.
        step_loss = all_reduce_sum(loss.detach().double().cpu().reshape(1), dist).item()
        if not math.isfinite(step_loss):
            raise TrainingDiverged(
                f"loss became {step_loss} at epoch {epoch + 1}, step {step + 1} (lr {lr:.4g}); "
                "the last good checkpoint is kept; lower --lr or check the data")
        optimizer.step()
        if dynamics is not None:
            dynamics.observe(batch["index"], logits, y)
        n = y.shape[0]
        sums += torch.tensor([loss.item() * n, (logits.argmax(1) == y).sum().item(), n,
                              float(batch.get("candidates", n)), len(batch.get("skipped", ()))],
                             dtype=torch.float64)
        if hook.batch_filter is not None or hook.step_filter is not None:
            kept_index.append(batch["index"].numpy())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    seconds = time.perf_counter() - t0
    total = all_reduce_sum(sums, dist)
    n = max(total[2].item(), 1.0)
    metrics: dict[str, Any] = {
        "epoch": epoch, "loss": total[0].item() / n, "accuracy": total[1].item() / n, "lr": lr,
        "images_per_s": total[2].item() / max(seconds, 1e-9), "seconds": round(seconds, 3),
        "skipped": int(total[4].item()),
    }
    if kept_index:
        metrics["kept_fraction"] = total[2].item() / max(total[3].item(), 1.0)
        # Diagnostics only: ground truth looked up by index, outside the loader.
        diag = noise_diagnostics(config.store, "train", np.concatenate(kept_index))
        if diag is not None:
            metrics["flipped_kept_share"] = diag["flipped_share"]
    return metrics


def _validate(model: nn.Module, loader, dist: DistInfo, amp: bool,
              prefix: str = "val") -> dict[str, Any]:
    out = predict_batches(model, loader, dist.device, amp=amp)
    logits = torch.from_numpy(out["logits"])
    labels = torch.from_numpy(out["label"])
    loss = F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
    correct = (logits.argmax(1) == labels).sum().item() if len(labels) else 0
    total = all_reduce_sum(torch.tensor([loss, correct, len(labels)], dtype=torch.float64), dist)
    n = max(total[2].item(), 1.0)
    return {f"{prefix}_loss": total[0].item() / n, f"{prefix}_accuracy": total[1].item() / n}


def _read_metrics(path: Path, *, before: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("epoch", 0) < before]


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole each epoch (small): a resumed run drops lines of epochs it redoes.
    atomic_write_text(path, "".join(json.dumps(m, allow_nan=False) + "\n" for m in history))
