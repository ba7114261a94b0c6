"""Co-teaching (Han et al., 2018): two networks, each trained on the small-loss part of every
batch as chosen by the other.

The benchmark's recipe for both networks (model, epochs, batch, lr schedule, SGD settings, the
uniform loader): each takes exactly the optimiser steps of one run, so the method costs two
runs. Per batch, with forget rate ``r(t)``, network A keeps the ``(1 - r) * B`` samples of
smallest loss under B and updates on them, and B on those of smallest loss under A (§3 of the
paper, Algorithm 1). ``r(t)`` ramps linearly from 0 to the estimated noise rate over the first
``T_k`` epochs: the paper uses ``T_k = 10`` of 200 epochs; a 12-epoch budget ramps over its
first quarter, so that the networks see the whole batch while they learn the easy patterns.
The noise rate is estimated as ``small-loss-gmm`` does (DivideMix's mixture on ``w_share``'s
loss), never read from the data set. Network A is the one scored.

Not resumable mid-run (the two networks are checkpointed together only at the end); a killed
run starts again, which is what the other benchmark methods do within a run too.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from swift_sampler.storage import StoreLayout, read_manifest
from swift_sampler.train.loader import create_loader
from swift_sampler.train.models import create_model
from swift_sampler.train.presets import resolve_config
from swift_sampler.train.schedules import lr_at


def forget_rate(progress: float, *, rate: float, ramp_epochs: float) -> float:
    """Forget rate at ``progress`` epochs: ``rate * min(progress / ramp_epochs, 1)``."""
    return float(rate) * min(progress / max(ramp_epochs, 1e-12), 1.0)


def exchange(loss_a: torch.Tensor, loss_b: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices each network updates on: A on B's ``keep`` smallest losses, B on A's."""
    keep = max(1, min(int(keep), loss_a.numel()))
    for_a = torch.argsort(loss_b, stable=True)[:keep]
    for_b = torch.argsort(loss_a, stable=True)[:keep]
    return for_a, for_b


def train_coteaching(store, *, config, rate: float, seed: int, ramp_epochs: float | None = None,
                     on_step=None) -> dict[str, Any]:
    """Train the two networks; returns ``{"model": network A, "steps": [a, b], ...}``.

    Args:
        config: the benchmark's ``BenchConfig`` (recipe, epochs, batch size, lr, workers).
        rate: the estimated noise rate (the forget rate reached after the ramp), in [0, 1).
        on_step: called as ``on_step(for_a, for_b)`` after each step (tests).
    """
    recipe = resolve_config(str(store), preset=config.train_preset, name=None, model=config.model,
                            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                            seed=seed, workers=config.workers, progress=False, val_split="")
    ramp = ramp_epochs if ramp_epochs is not None else max(1.0, recipe.epochs / 4)
    loader, ds = create_loader(store, "train", batch_size=recipe.batch_size, train=True, seed=seed,
                               num_workers=recipe.workers, shuffle_buffer=recipe.shuffle_buffer)
    manifest = read_manifest(StoreLayout(store))
    classes = len(manifest["classes"])
    chans = int(manifest.get("image", {}).get("channels") or 3)
    nets, opts = [], []
    for k in range(2):  # two initialisations from one seed, so the run is reproducible
        torch.manual_seed(seed * 2 + k)
        net = create_model(recipe.model, classes, chans, ds.image_size)
        nets.append(net)
        opts.append(torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    nesterov=recipe.nesterov, weight_decay=recipe.weight_decay))
    steps = len(loader)
    taken = [0, 0]
    kept = 0.0
    t0 = time.perf_counter()
    for epoch in range(recipe.epochs):
        ds.set_epoch(epoch)
        for net in nets:
            net.train()
        for step, batch in enumerate(loader):
            progress = epoch + step / steps
            lr = lr_at(progress, schedule=recipe.schedule, lr=recipe.lr, epochs=recipe.epochs,
                       milestones=recipe.milestones, gamma=recipe.gamma, warmup=recipe.warmup)
            x, y = batch["image"], batch["label"]
            logits = [net(x) for net in nets]
            losses = [F.cross_entropy(z.float(), y, reduction="none") for z in logits]
            keep = round((1.0 - forget_rate(progress, rate=rate, ramp_epochs=ramp)) * len(y))
            chosen = exchange(losses[0].detach(), losses[1].detach(), keep)
            for k in range(2):
                for group in opts[k].param_groups:
                    group["lr"] = lr
                opts[k].zero_grad(set_to_none=True)
                losses[k][chosen[k]].mean().backward()
                opts[k].step()
                taken[k] += 1
            kept += len(chosen[0]) / len(y)
            if on_step is not None:
                on_step(*chosen)
    return {"model": nets[0].eval(), "steps": taken, "kept_fraction": kept / max(taken[0], 1),
            "ramp_epochs": ramp, "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["exchange", "forget_rate", "train_coteaching"]
