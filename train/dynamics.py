"""Training dynamics: per-image statistics over the epochs of a run, from its own training steps.

A model that has fit noisy labels ranks them poorly by its final loss; statistics accumulated
over the whole run keep ranking them well (the loss averaged over epochs; the area under the
margin, AUM, Pleiss et al. 2020; dataset cartography's confidence and variability, Swayamdipta
et al. 2020; how often the prediction disagrees with the given label). All of them come from the
logits of the training step the run computes anyway: no extra forward pass.

Per image and epoch, the views of the image trained on in that epoch (one in uniform training;
0-2 through a sampler stage) are averaged first; the run statistics are over the epochs in which
the image was seen:

- ``epochs_seen``: epochs in which the image was trained on;
- ``loss_mean``, ``loss_ema``: cross-entropy with the given label (no label smoothing), mean
  over epochs and exponential moving average (weight ``EMA_DECAY`` on the past);
- ``margin_mean`` (AUM): logit of the given label minus the largest other logit, mean over epochs;
- ``prob_mean``, ``prob_std`` (cartography's confidence and variability): probability of the
  given label, mean and standard deviation over epochs;
- ``disagree_epochs``: epochs whose prediction (the arg-max, majority of the epoch's views)
  differs from the given label;
- ``learned_epoch``: the first epoch from which the prediction stays equal to the given label:
  one past the last epoch whose prediction was wrong (0: never wrong; the number of epochs
  run: still wrong at the end).

The given label is the training label; ground truth is never read. The state lives in the run's
checkpoint (so a resumed run continues it exactly) and ``dynamics.parquet`` in the run folder
is the table derived from it, rewritten each epoch. Under torchrun each rank observes its own
images and the epoch sums are added across ranks before the update, so every rank holds the
same state and the table equals a single process's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from swift_sampler.storage import StoreLayout, atomic_write_parquet, read_manifest, sha256_file

from .distributed import DistInfo, all_reduce_sum

EMA_DECAY = 0.9  # weight of the past in loss_ema: about the last ten epochs
COLUMNS = ("epochs_seen", "loss_mean", "loss_ema", "margin_mean", "prob_mean", "prob_std",
           "disagree_epochs", "learned_epoch")
# Per-epoch sums per image, added over the image's views of the epoch:
# views, loss, margin, prob, wrong views.
_EPOCH_FIELDS = 5
# Run state per image: epochs seen, sum of per-epoch loss, loss EMA, sum of margin, sum of
# prob, sum of prob squared, disagreeing epochs, last epoch (+1) predicted wrong.
_STATE_FIELDS = ("seen", "loss_sum", "loss_ema", "margin_sum", "prob_sum", "prob_sq_sum",
                 "disagree", "last_wrong")


class TrainingDynamics:
    """Accumulates the statistics of ``num_images`` training images (dense indices)."""

    def __init__(self, num_images: int) -> None:
        self.num_images = int(num_images)
        self.state = {k: np.zeros(self.num_images, dtype=np.float64) for k in _STATE_FIELDS}
        self.epochs_done = 0
        self._epoch = np.zeros((_EPOCH_FIELDS, self.num_images), dtype=np.float64)

    # -- during an epoch -------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one training step's views: ``index`` ``(B,)``, ``logits`` ``(B, C)``, ``labels``."""
        z = logits.detach().cpu().double()  # a B x C copy: cheap next to the step
        y = labels.detach().cpu().long()
        given = F.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0]
        other = z.clone()
        other.scatter_(1, y[:, None], float("-inf"))
        margin = z.gather(1, y[:, None])[:, 0] - other.max(dim=1).values
        wrong = (z.argmax(dim=1) != y).double()
        values = torch.stack([torch.ones_like(given), -given, margin, given.exp(), wrong]).numpy()
        idx = index.detach().cpu().numpy().astype(np.int64)
        for row in range(_EPOCH_FIELDS):
            np.add.at(self._epoch[row], idx, values[row])

    def end_epoch(self, epoch: int, dist: DistInfo) -> None:
        """Fold the epoch's views (summed over ranks) into the run statistics."""
        sums = all_reduce_sum(torch.from_numpy(self._epoch), dist).numpy()
        self._epoch = np.zeros_like(self._epoch)
        views = sums[0]
        seen = views > 0
        n = views[seen]
        loss, margin, prob = sums[1][seen] / n, sums[2][seen] / n, sums[3][seen] / n
        wrong = sums[4][seen] / n > 0.5  # the epoch's majority vote; a tie counts as right
        s = self.state
        first = s["seen"][seen] == 0
        s["loss_ema"][seen] = np.where(first, loss, EMA_DECAY * s["loss_ema"][seen]
                                       + (1 - EMA_DECAY) * loss)
        s["seen"][seen] += 1
        s["loss_sum"][seen] += loss
        s["margin_sum"][seen] += margin
        s["prob_sum"][seen] += prob
        s["prob_sq_sum"][seen] += prob * prob
        s["disagree"][seen] += wrong
        s["last_wrong"][np.flatnonzero(seen)[wrong]] = epoch + 1
        self.epochs_done = epoch + 1

    # -- results ---------------------------------------------------------------------------
    def table(self) -> pa.Table:
        """One row per image, ``index`` then ``COLUMNS``; statistics of unseen images are null."""
        s = self.state
        seen = s["seen"]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = {k: s[k] / seen for k in ("loss_sum", "margin_sum", "prob_sum", "prob_sq_sum")}
        var = np.maximum(mean["prob_sq_sum"] - mean["prob_sum"] ** 2, 0.0)
        mask = seen == 0

        def col(values: np.ndarray) -> pa.Array:
            return pa.array(values, mask=mask)

        return pa.table({
            "index": pa.array(np.arange(self.num_images, dtype=np.int64)),
            "epochs_seen": pa.array(seen.astype(np.int32)),
            "loss_mean": col(mean["loss_sum"]),
            "loss_ema": col(s["loss_ema"]),
            "margin_mean": col(mean["margin_sum"]),
            "prob_mean": col(mean["prob_sum"]),
            "prob_std": col(np.sqrt(var)),
            "disagree_epochs": col(s["disagree"].astype(np.int32)),
            "learned_epoch": col(s["last_wrong"].astype(np.int32)),
        })

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Tensors and numbers only, for a ``weights_only`` checkpoint."""
        return {"epochs_done": self.epochs_done, "num_images": self.num_images,
                **{k: torch.from_numpy(v.copy()) for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if int(state["num_images"]) != self.num_images:
            raise ValueError(f"dynamics of {state['num_images']} images, the split has "
                             f"{self.num_images}")
        self.epochs_done = int(state["epochs_done"])
        for k in _STATE_FIELDS:
            self.state[k] = state[k].numpy().astype(np.float64).copy()


def store_dynamics(store: str | os.PathLike, checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """Write the dynamics held in ``checkpoint`` (its run's, up to its epoch) to the store.

    ``STORE/dynamics.parquet`` then feeds the ``dynamics`` view and the ``features`` view's
    per-image columns. A checkpoint without dynamics (a run from before they were recorded, a
    model trained elsewhere) removes a previous table, so the store never pairs one checkpoint's
    features with another's dynamics. Returns a summary, or None when there were none.
    """
    from .checkpoint import CheckpointError, load_checkpoint

    layout = StoreLayout(store)
    ckpt = load_checkpoint(checkpoint)
    state = ckpt.get("dynamics")
    if state is None:
        layout.dynamics.unlink(missing_ok=True)
        return None
    manifest = read_manifest(layout)
    if ckpt.get("store_id") != manifest["store_id"]:
        raise CheckpointError(f"{checkpoint} was trained on another store (store_id differs); "
                              "its dynamics do not describe this store's images")
    recorder = TrainingDynamics(int(state["num_images"]))
    recorder.load_state_dict(state)
    table = recorder.table()
    meta = {"checkpoint_sha256": sha256_file(checkpoint), "epochs": recorder.epochs_done,
            "store_id": manifest["store_id"]}
    table = table.replace_schema_metadata({b"swift_sampler": json.dumps(meta).encode()})
    atomic_write_parquet(layout.dynamics, table)
    return {"dynamics": str(layout.dynamics), "dynamics_epochs": recorder.epochs_done}
