"""The inner loop (arXiv 2410.05578, §3.4): fine-tune ``w_share`` with a candidate sampler, score on val.

Default (``start="scratch"``, chosen by the study in ``bench/bench_inner_loop.py``,
``results/inner-loop/``): a short run from scratch, ``E_f`` epochs of ``w_share``'s recipe
compressed to them, with the candidate sampler, on common random numbers; the score is val
top-1. On noisy CIFAR (cpu-quick) it ranked 10 sensible samplers as the full run from scratch
(seed 0) does with Spearman 0.96 (signal/noise 9.4), against 0.92 (4.8) for ``"early"`` (``w_share``'s
own run resumed ``E_f`` epochs before its end) and 0.84 (3.7) for the paper's fine-tune from
the final checkpoint (``"final"``, described below), at the same 3 epochs per trial.

The sampler stage draws fresh crops by default (``features="image"``: each crop gets its image's
mean stored tau; no extra forward pass either); ``"store"`` replays the stored crops with their
own features, the paper's per-crop unit. The picks through fresh crops trained better at 40%
noise and no worse at 0% (results/README.md).

With ``start="final"`` (the paper's), ``P(tau)`` is approximated by loading ``w_share`` (the
checkpoint the features were built from), fine-tuning it for ``E_f`` epochs with the sampler in the loader's 2x oversample-and-
filter stage (features looked up in the feature store: no extra forward passes), and taking
top-1 on the val split, labels as they are (noisy where noise was injected, as in the paper).

Choices of ``"final"`` (measured on digits; see ``bench/bench_trial.py``):

- The fine-tune uses ``w_share``'s recipe (model, momentum, weight decay, batch size) with a
  *cosine* schedule from ``lr_fraction`` x ``w_share``'s peak lr (default 1.0) to 0, so every
  trial ends annealed and the score does not depend on where in a cycle the run stopped.
  Measured on digits (40% noise, 5 epochs, 8 samplers x 2 seeds): at 0.25x the peak lr the
  weights barely leave ``w_share`` and the score mostly reflects the seed (noise sd 0.69
  points against a spread of 0.53 across the 7 sensible samplers); at 1x the noise fell to
  0.48 and the spread rose to 0.78 (signal/noise 0.8 -> 1.6; 5 -> 23 with a bad sampler in
  the panel). A larger step lets the sampler, not the seed, decide where the fine-tune ends,
  as §3.4 asks (the fine-tuned weights should reach the sampler's own loss level).
- ``repeats`` fine-tunes with different seeds and averages their scores: the objective's noise
  falls by ``sqrt(repeats)`` at ``repeats`` times the cost.
- A trial's fine-tune seed comes from the loop (``trial_seeds``; repeat ``r`` of seed ``s`` uses
  ``s * repeats + r``), so a resumed search re-runs a cut-off trial exactly.

Every rank runs the objective under torchrun (the trainer wraps the model in DDP); the val
score is summed over ranks, so every rank returns the same ``TrialResult``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swift_sampler.pipeline.sampler.file import SamplerFileError, check_not_all_zero
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.storage import (
    StoreError,
    StoreLayout,
    read_features_meta,
    read_manifest,
    sha256_file,
)
from swift_sampler.train.checkpoint import CheckpointError, check_classes, load_checkpoint
from swift_sampler.train.distributed import DistInfo, all_reduce_sum, init_distributed
from swift_sampler.train.evaluate import noise_diagnostics, predict_batches
from swift_sampler.train.loader import create_loader
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.trainer import SamplerHook, TrainingDiverged, fit

from .loop import TrialResult
from .settings import FEATURE_MODES, SCORES, STARTS, InnerLoopSettings

log = logging.getLogger(__name__)


def check_search_inputs(store: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """Refuse a checkpoint that is not the one the store's features were built from.

    Returns:
        ``{"store_id", "features_checkpoint_sha256", "checkpoint": meta dict}``.

    Raises:
        StoreError: no features/tables yet, features of another checkpoint, class or channel
            count mismatch; ``CheckpointError`` for an unreadable checkpoint.
    """
    layout = StoreLayout(store).require()
    manifest = read_manifest(layout)
    if not layout.features_meta.is_file():
        raise StoreError(f"{layout.root} has no features (features.json missing); run "
                         "`swift-sampler pipeline build-features --checkpoint CKPT` first")
    feats = read_features_meta(layout)
    if not feats.get("done"):
        raise StoreError(f"features of {layout.root} are unfinished; run build-features again to finish")
    if not layout.tables_meta.is_file():
        raise StoreError(f"{layout.root} has no tables (tables/tables.json missing); run "
                         "`swift-sampler pipeline build-features` again to build them")
    ckpt = load_checkpoint(checkpoint)
    classes = len(manifest["classes"])
    channels = int((manifest.get("image") or {}).get("channels") or 3)
    if int(ckpt["num_classes"]) != classes or int(ckpt["in_chans"]) != channels:
        raise CheckpointError(
            f"{checkpoint} was trained for {ckpt['num_classes']} classes x {ckpt['in_chans']} "
            f"channels but the store has {classes} classes x {channels} channels; pass the "
            "w_share checkpoint trained on this store")
    check_classes(ckpt, manifest, str(checkpoint))
    sha = sha256_file(checkpoint)
    if feats.get("checkpoint_sha256") != sha:
        raise StoreError(
            f"the store's features were built from checkpoint sha256 {feats.get('checkpoint_sha256')}, "
            f"but {checkpoint} has sha256 {sha}; pass the checkpoint the features came from "
            "(w_share), or rebuild the features from this one with build-features --overwrite")
    if ckpt.get("store_id") not in (None, manifest["store_id"]):
        log.warning("%s was trained on another store (store_id %s); using it as w_share anyway",
                    checkpoint, ckpt.get("store_id"))
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "dynamics")}
    return {"store_id": manifest["store_id"], "features_checkpoint_sha256": sha, "checkpoint": meta}


class InnerLoopObjective:
    """``objective(sampler, seed) -> TrialResult``: fine-tune ``w_share``, score top-1 on val.

    Args:
        store: store directory with features and tables built from ``checkpoint``.
        checkpoint: ``w_share`` (``runs/NAME/checkpoint.pt``).
        settings: ``InnerLoopSettings``.
        workers: loader workers per rank; device: None (cuda when present) or a torch device.
        val_split: split scored.
        hook_factory: builds the loader's sampler stage, called as ``hook_factory(store,
            sampler, features=, seed=, model=) -> SamplerHook``; default
            ``train.sampling.create_sampler_hook``.
    """

    def __init__(self, store: str | Path, checkpoint: str | Path, settings: InnerLoopSettings | None = None,
                 *, workers: int = 2, device: str | None = None, val_split: str = "val",
                 hook_factory: Callable[..., SamplerHook] | None = None) -> None:
        self.hook_factory = hook_factory
        self.store = str(StoreLayout(store).require().root)
        self.checkpoint = str(checkpoint)
        self.settings = (settings or InnerLoopSettings()).check()
        self.info = check_search_inputs(store, checkpoint)
        self.workers, self.device, self.val_split = workers, device, val_split
        manifest = read_manifest(StoreLayout(store))
        if not (manifest["splits"].get(val_split) or {}).get("shards"):
            raise StoreError(f"store {self.store} has no {val_split!r} split to score the trials on")
        meta = self.info["checkpoint"]
        recipe = meta.get("config") or {}
        s = self.settings
        self.recipe = {
            "model": meta["model_name"],
            "image_size": int(meta["image_size"]),
            "epochs": int(s.epochs),
            "batch_size": int(s.batch_size or recipe.get("batch_size") or 128),
            "lr": float(s.lr if s.lr is not None else s.lr_fraction * float(recipe.get("lr", 0.1))),
            "schedule": s.schedule,
            "warmup": float(s.warmup),
            "momentum": float(recipe.get("momentum", 0.9)),
            "nesterov": bool(recipe.get("nesterov", True)),
            "weight_decay": float(recipe.get("weight_decay", 5e-4)),
            "label_smoothing": float(recipe.get("label_smoothing", 0.0)),
            "repeats": int(s.repeats),
            "features": s.features,
        }
        # "final" writes the recipe as searches made before these settings did (same search.json).
        if s.start != "final":
            self.recipe.update(self._run_recipe(meta, recipe, s))
        if s.score != "top1":
            self.recipe["score"] = s.score
        # Searches recorded before the rule was a setting used "es" and have no field: their
        # trials do not mix with another rule's, so resuming one with the default is refused.
        if s.selection != "es":
            self.recipe["selection"] = s.selection
        # Trials crop as w_share's run did; recorded only when not the default, so searches
        # made before the setting existed resume unchanged.
        if recipe.get("augment", "crop-flip") != "crop-flip":
            self.recipe["augment"] = recipe["augment"]
        self._frozen = None  # w_share for online features, loaded on first use

    def _run_recipe(self, meta: dict[str, Any], recipe: dict[str, Any], s: InnerLoopSettings) -> dict[str, Any]:
        """w_share's own schedule, for the "early" and "scratch" starts."""
        run_epochs = int(recipe.get("epochs") or 0)
        # w_share's own peak lr, unless one is given explicitly (``lr_fraction`` belongs to the
        # fresh cosine of "final" and is not used here).
        out = {"start": s.start, "lr": float(s.lr if s.lr is not None else recipe.get("lr", 0.1)),
               "schedule": recipe.get("schedule", "one-cycle"),
               "milestones": [int(m) for m in recipe.get("milestones") or ()],
               "gamma": float(recipe.get("gamma", 0.1)), "warmup": float(recipe.get("warmup", 0.0))}
        if s.start == "early":
            from swift_sampler.train.trainer import epoch_checkpoint

            done = run_epochs - int(s.epochs)
            path = epoch_checkpoint(self.checkpoint, done)
            if run_epochs < 1:
                raise StoreError(
                    f"the early-checkpoint inner loop resumes w_share's training run, and "
                    f"{self.checkpoint} records none (no epochs in its config); use a w_share "
                    "trained by `swift-sampler train` or pick another start")
            if done < 1 or not path.is_file():
                raise StoreError(
                    f"the early-checkpoint inner loop needs w_share's checkpoint after epoch {done} "
                    f"of {run_epochs} ({path}), which is not there; train w_share with this version "
                    "(it keeps the checkpoints of its last epochs) or pick another start")
            out.update(continue_from=str(path), run_epochs=run_epochs,
                       continue_from_sha256=sha256_file(path))
        return out

    def describe(self) -> dict[str, Any]:
        """The resolved fine-tune recipe (what defines the objective; goes into search.json)."""
        return {**self.recipe, "val_split": self.val_split}

    # -- one fine-tune --------------------------------------------------------------------
    def finetune(self, sampler: Sampler, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Fine-tune ``w_share`` once with ``sampler``; returns ``(model, info)``.

        ``info``: ``epochs`` run, mean ``kept_fraction`` and ``flipped_kept_share`` over epochs
        (NaN without a filter stage / without noise ground truth).

        Raises:
            TrainingDiverged: the loss became non-finite.
        """
        r = self.recipe
        start = r.get("start", "final")
        where = {"final": dict(init=self.checkpoint, epochs=r["epochs"]),
                 "early": dict(continue_from=r.get("continue_from"), epochs=r.get("run_epochs")),
                 "scratch": dict(epochs=r["epochs"])}[start]
        config = resolve_config(
            self.store, name=None, model=r["model"], batch_size=r["batch_size"],
            lr=r["lr"], schedule=r["schedule"], warmup=r["warmup"], momentum=r["momentum"],
            milestones=r.get("milestones"), gamma=r.get("gamma"),
            nesterov=r["nesterov"], weight_decay=r["weight_decay"],
            label_smoothing=r["label_smoothing"], seed=int(seed), workers=self.workers,
            image_size=r["image_size"], val_split="", device=self.device,
            augment=r.get("augment", "crop-flip"), save_checkpoints=False, keep_checkpoints=0,
            progress=False, **where)
        epochs: list[dict[str, Any]] = []
        result = fit(config, sampler=self.hook(sampler, seed), on_epoch_end=epochs.append)

        def mean(key: str) -> float:
            vals = [m[key] for m in epochs if m.get(key) is not None]
            return float(np.mean(vals)) if vals else math.nan

        return result.model, {"epochs": len(epochs), "kept_fraction": mean("kept_fraction"),
                              "flipped_kept_share": mean("flipped_kept_share")}

    def _eval_loader(self, split: str, dist):
        """This rank's share of ``split``, unshuffled and unaugmented, in one fixed order."""
        loader, _ = create_loader(self.store, split, batch_size=max(256, self.recipe["batch_size"]),
                                  train=False, rank=dist.rank, world_size=dist.world_size,
                                  num_workers=min(self.workers, 1), image_size=self.recipe["image_size"],
                                  pin_memory=dist.device.type == "cuda")
        return loader

    def score(self, model: torch.nn.Module, split: str | None = None) -> dict[str, float]:
        """Top-1 of ``model`` on ``split`` (default the val split), summed over ranks.

        Returns ``top1`` (against the split's labels), ``prob`` (mean predicted probability of
        the label) and, for diagnostics only, ``true_top1`` (against the original labels; NaN
        without noise).
        """
        split = split or self.val_split
        dist = _dist(self.device)
        loader = self._eval_loader(split, dist)
        out = predict_batches(model, loader, dist.device)
        pred = out["logits"].argmax(1) if len(out["label"]) else np.zeros(0, np.int64)
        correct = float((pred == out["label"]).sum())
        prob = 0.0
        if len(pred):
            p = torch.softmax(torch.from_numpy(out["logits"]).double(), 1).numpy()
            prob = float(p[np.arange(len(pred)), out["label"]].sum())
        diag = noise_diagnostics(self.store, split, out["index"], pred) if len(pred) else None
        true_correct = math.nan
        if diag is not None:
            true_correct = ((diag["clean_accuracy"] or 0.0) * diag["n_clean"]
                            + (diag["flipped_true_accuracy"] or 0.0) * diag["n_flipped"])
        total = all_reduce_sum(torch.tensor([correct, float(len(pred)), true_correct, prob],
                                            dtype=torch.float64), dist)
        n = max(total[1].item(), 1.0)
        return {"top1": total[0].item() / n, "prob": total[3].item() / n,
                "true_top1": total[2].item() / n, "count": int(total[1].item())}

    def paired_gain(self, reference: torch.nn.Module, model: torch.nn.Module,
                    split: str | None = None) -> dict[str, float]:
        """Val top-1 of ``model`` minus ``reference``'s on the same images, with its standard
        error over the images, ``sqrt(var(c_model - c_reference) / n)`` (``c``: per-image 0/1
        correctness).

        The error is what a choice made on this split carries even when training repeats
        exactly: the split is one sample of images, and seed repeats on it do not measure that.
        """
        split = split or self.val_split
        dist = _dist(self.device)
        loader = self._eval_loader(split, dist)
        correct = []
        for m in (reference, model):  # the eval loader reads this rank's images in one order
            out = predict_batches(m, loader, dist.device)
            order = np.argsort(out["index"], kind="stable")
            correct.append((out["logits"].argmax(1) == out["label"])[order].astype(np.float64)
                           if len(order) else np.zeros(0))
        d = correct[1] - correct[0]
        total = all_reduce_sum(torch.tensor([d.sum(), (d * d).sum(), float(len(d))], dtype=torch.float64), dist)
        s1, s2, n = (x.item() for x in total)
        gain = s1 / max(n, 1.0)
        var = (s2 - n * gain * gain) / (n - 1) if n > 1 else math.nan
        return {"gain": gain, "se": math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan, "count": int(n)}

    # -- the objective --------------------------------------------------------------------
    def __call__(self, sampler: Sampler, seed: int) -> TrialResult:
        reps = self.recipe["repeats"]
        scores, true_scores, kept, flipped, epochs = [], [], [], [], 0
        t0 = time.perf_counter()
        try:
            check_not_all_zero(sampler, self.store)
        except SamplerFileError as e:  # nothing would be trained: the worst possible sampler
            return TrialResult(score=math.nan, epochs=0, error=str(e))
        for r in range(reps):
            try:
                model, info = self.finetune(sampler, int(seed) * reps + r)
            except TrainingDiverged as e:
                return TrialResult(score=math.nan, epochs=epochs, error=str(e))
            epochs += info["epochs"]
            s = self.score(model)
            scores.append(s[self.recipe.get("score", "top1")])
            true_scores.append(s["true_top1"])
            kept.append(info["kept_fraction"])
            flipped.append(info["flipped_kept_share"])
        return TrialResult(
            score=float(np.mean(scores)), epochs=epochs, kept_fraction=_nanmean(kept),
            flipped_kept_share=_nanmean(flipped),
            extra={"scores": scores, "true_top1": _nanmean(true_scores),
                   "seconds": time.perf_counter() - t0})

    def hook(self, sampler: Sampler, seed: int, describe: dict[str, Any] | None = None) -> SamplerHook:
        """The loader's sampler stage for ``sampler`` with this objective's feature source."""
        create_sampler_hook = self.hook_factory
        if create_sampler_hook is None:
            from swift_sampler.train.sampling import create_sampler_hook
        if self.recipe["features"] in ("store", "image"):
            return create_sampler_hook(self.store, sampler, features=self.recipe["features"], seed=int(seed),
                                       describe=describe, selection=self.settings.selection)
        device = _dist(self.device).device
        if self._frozen is None:
            from swift_sampler.train.checkpoint import load_model

            self._frozen, _ = load_model(self.checkpoint, device)
        return create_sampler_hook(self.store, sampler, features="online", scorer=self._frozen,
                                   batch_size=self.recipe["batch_size"], device=device, seed=int(seed),
                                   describe=describe, selection=self.settings.selection)


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _dist(device: str | None) -> DistInfo:
    return init_distributed(device)


__all__ = ["FEATURE_MODES", "SCORES", "STARTS", "InnerLoopObjective", "InnerLoopSettings",
           "check_search_inputs"]
