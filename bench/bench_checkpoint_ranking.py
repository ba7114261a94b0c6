"""How well a model's loss ranks the flipped train labels: which checkpoint should score crops.

    .venv/bin/python bench/bench_checkpoint_ranking.py --store STORE CKPT [CKPT ...]

A static sampler can only be as good as the ranking its features give, so this measures the
ranking itself, per checkpoint (e.g. the epochs ``train`` keeps of ``w_share``'s run): the
per-image cross-entropy on the plain view of every train image, its ROC AUC for telling flipped
labels from clean ones, and the flipped share among the images a loss filter keeps at each
``--keep`` fraction (lowest loss first). The store's own features (the K crops ``w_share``
scored, mean per image) are measured the same way, and so is what a step sampler in the
loss direction (``c = (1, 0)``) leaves eligible: for each ``--cuts`` value of ``t`` (the
cumulative gradient norm of eq. 10, crops sorted by loss), the share of the stored crops below
it and their flipped share. Ground truth of the noise is read here for
this diagnostic only; nothing the search or a sampler uses reads it. JSON, last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from swift_sampler.storage import StoreLayout, literal, read_view
from swift_sampler.train.checkpoint import load_model
from swift_sampler.train.evaluate import predict


def ranking(loss: np.ndarray, flipped: np.ndarray, keeps: list[float]) -> dict[str, float]:
    """AUC of ``loss`` for ``flipped`` and the flipped share of the lowest-loss ``keep`` share."""
    order = np.argsort(loss, kind="stable")
    out = {"auc": round(float(roc_auc_score(flipped, loss)), 4)}
    for keep in keeps:
        kept = order[: int(round(keep * len(loss)))]
        out[f"flipped_in_kept_{keep:g}"] = round(float(flipped[kept].mean()), 4)
    return out


def loss_steps(crops, flipped_by_index: np.ndarray, cuts: list[float]) -> list[dict[str, float]]:
    """For a step ``t < cut`` in the loss direction: the eligible share of the crops and the
    flipped share among them (``t``: cumulative gradient norm over the crops sorted by loss)."""
    order = np.argsort(crops.column("loss").to_numpy(), kind="stable")
    grad = crops.column("grad_norm").to_numpy()[order]
    flipped = flipped_by_index[crops.column("index").to_numpy()[order]]
    t = np.cumsum(grad) / grad.sum()
    out = []
    for cut in cuts:
        k = int(np.searchsorted(t, cut))
        out.append({"cut": cut, "eligible": round(k / len(t), 4),
                    "flipped_in_eligible": round(float(flipped[:k].mean()) if k else 0.0, 4)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--keep", default="0.5,0.6", help="kept fractions to report (0.5,0.6)")
    p.add_argument("--cuts", default="0.1,0.2,0.3,0.37,0.4,0.5,0.7",
                   help="cgf cut points t of a loss step to report (0.1,...,0.7)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    keeps = [float(k) for k in args.keep.split(",")]
    cuts = [float(c) for c in args.cuts.split(",")]
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        p.error(f"no checkpoint at {', '.join(missing)}")
    t = read_view(args.store, "samples", ["index", "label", "true_label"], where=f"split = {literal('train')}")
    if t.column("true_label").null_count:
        p.error(f"{args.store} records no original labels: nothing to measure the ranking against")
    index = t.column("index").to_numpy()
    flipped_by_index = np.zeros(int(index.max()) + 1, bool)
    flipped_by_index[index] = t.column("label").to_numpy() != t.column("true_label").to_numpy()
    rows = []
    for ckpt in args.checkpoints:
        model, _ = load_model(ckpt)
        out = predict(args.store, model, "train", workers=args.workers)
        loss = F.cross_entropy(torch.from_numpy(out["logits"]).double(), torch.from_numpy(out["label"]),
                               reduction="none").numpy()
        rows.append({"checkpoint": str(ckpt), **ranking(loss, flipped_by_index[out["index"]], keeps)})
        print(f"{ckpt}: {rows[-1]}", file=sys.stderr)
    stored, steps = None, None
    if StoreLayout(args.store).features_meta.is_file():
        crops = read_view(args.store, "feature_parts", ["index", "loss", "grad_norm"])
        f = crops.group_by("index").aggregate([("loss", "mean")])
        stored = ranking(f.column("loss_mean").to_numpy(), flipped_by_index[f.column("index").to_numpy()], keeps)
        print(f"stored features (image-mean loss): {stored}", file=sys.stderr)
        steps = loss_steps(crops, flipped_by_index, cuts)
        print(f"loss steps in cgf over the stored crops: {steps}", file=sys.stderr)
    print(json.dumps({"store": str(args.store), "checkpoints": rows, "stored_features": stored,
                      "loss_steps": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
