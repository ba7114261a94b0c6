"""Which per-image feature tells wrong labels apart: final-model scores against training dynamics.

    .venv/bin/python bench/bench_detection.py --store NAME=STORE [NAME=STORE ...] --out results/detection

Each STORE holds features built from a checkpoint of a run that recorded its training dynamics
(any benchmark store after its ``small-loss-gmm``, ``small-loss`` or ``ss`` method ran).
For every feature, a noise score per image (higher: more likely wrong, in the direction fixed
below before anything was measured), then:

- ``auc``: ROC AUC of the score for the flipped labels;
- ``flipped_in_kept_{0.5,0.6,0.7}``: the flipped share among the images a filter keeps when it
  keeps that share with the lowest scores.

Each under a global ranking and a per-class one (the score's percentile within its given
label: a class whose images are all hard is not dropped wholesale). The final model's features
are the mean over the stored crops of each image. Ground truth of the noise (injected, or the
clean labels behind a label file) is read here for this diagnostic only; no feature, table or
sampler reads it. Prints one JSON line; writes ``OUT/detection.json`` and ``OUT/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from swift_sampler.pipeline.sampler.pair import CROP_FEATURES, FEATURES, noisy_end
from swift_sampler.storage import StoreLayout, read_view

KEEPS = (0.5, 0.6, 0.7)
# feature -> sign that turns it into a noise score (higher = more likely a wrong label), as the
# sampler declares it (``pipeline.sampler.pair.noisy_end``, fixed before anything was measured):
# a wrong label is hard to fit (high loss, low margin and probability of the given label,
# disagreement, learned late); E^r is low for it; cartography's variability has no a-priori
# sign (+1 is kept).
DIRECTIONS = {f: noisy_end(f) for f in FEATURES}
FINAL = CROP_FEATURES


def per_class_percentile(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The score's percentile (0, 1] among the images of the same given label."""
    out = np.empty(score.size, dtype=np.float64)
    for c in np.unique(labels):
        mine = labels == c
        out[mine] = rankdata(score[mine], method="average") / mine.sum()
    return out


def detection(score: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUC of ``score`` for ``flipped``, and the flipped share of each lowest-score ``KEEPS``."""
    order = np.argsort(score, kind="stable")
    out = {"auc": round(float(roc_auc_score(flipped, score)), 4)}
    for keep in KEEPS:
        kept = order[: int(round(keep * score.size))]
        out[f"flipped_in_kept_{keep:g}"] = round(float(flipped[kept].mean()), 4)
    return out


def image_features(store: Path) -> dict[str, np.ndarray]:
    """Per train image (index order): the final model's features (mean over the stored crops)
    and the training dynamics, from the store's catalog."""
    samples = read_view(store, "samples", ["index", "label", "true_label"],
                        where="split = 'train'", order_by='"index"')
    n = samples.num_rows
    crops = read_view(store, "feature_parts", ["index", *FINAL])
    index = crops.column("index").to_numpy()
    counts = np.bincount(index, minlength=n)
    out = {f: np.bincount(index, weights=crops.column(f).to_numpy(), minlength=n) / counts
           for f in FINAL}
    if StoreLayout(store).dynamics.is_file():
        dyn = read_view(store, "dynamics", ["index", *[f for f in DIRECTIONS if f not in FINAL]],
                        order_by='"index"')
        if dyn.num_rows != n:
            raise SystemExit(f"{store}: dynamics of {dyn.num_rows} images, {n} train images")
        for f in dyn.column_names[1:]:
            out[f] = dyn.column(f).to_numpy(zero_copy_only=False).astype(np.float64)
    label = samples.column("label").to_numpy()
    true = samples.column("true_label").to_numpy(zero_copy_only=False)
    if true is None or np.any(np.isnan(true.astype(np.float64))):
        raise SystemExit(f"{store}: no ground truth (true_label) for every train image; the "
                         "study needs a store with injected noise or a label file")
    out["_label"], out["_flipped"] = label, (label != true.astype(label.dtype))
    return out


def study(store: Path) -> dict[str, object]:
    f = image_features(store)
    label, flipped = f.pop("_label"), f.pop("_flipped")
    rows = {}
    for name, values in f.items():
        score = DIRECTIONS[name] * values
        if np.isnan(score).any():  # an image never trained on (sampler runs): rank it last
            score = np.where(np.isnan(score), np.nanmax(score), score)
        rows[name] = {"global": detection(score, flipped),
                      "per_class": detection(per_class_percentile(score, label), flipped)}
    return {"store": str(store), "images": int(label.size),
            "flipped_share": round(float(flipped.mean()), 4), "features": rows}


def markdown(results: dict[str, dict]) -> str:
    lines = ["# Noise detection by feature", "",
             "ROC AUC for the flipped train labels, and the flipped share of the lowest-scored "
             "60% (what a filter keeping 60% trains on), global / per-class ranking.", ""]
    for name, r in results.items():
        lines += [f"## {name} ({r['images']:,} train images, {100 * r['flipped_share']:.1f}% "
                  "flipped)", "", "| feature | AUC | AUC per class | flipped in kept 60% | "
                  "per class |", "|---|---|---|---|---|"]
        ranked = sorted(r["features"].items(), key=lambda kv: -kv[1]["global"]["auc"])
        for feat, v in ranked:
            g, c = v["global"], v["per_class"]
            final = " (final model)" if feat in FINAL else ""
            lines.append(f"| {feat}{final} | {g['auc']:.3f} | {c['auc']:.3f} | "
                         f"{100 * g['flipped_in_kept_0.6']:.1f}% | "
                         f"{100 * c['flipped_in_kept_0.6']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", action="append", required=True, metavar="NAME=STORE",
                   help="a store with features and dynamics, named for the table (repeatable)")
    p.add_argument("--out", default=None, help="folder for detection.json and README.md")
    args = p.parse_args(argv)
    results = {}
    for spec in args.store:
        name, _, path = spec.rpartition("=")
        path = Path(path)
        if not StoreLayout(path).features_meta.is_file():
            print(f"error: {path} holds no features; build them first", file=sys.stderr)
            return 2
        results[name or path.name] = study(path)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "detection.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "README.md").write_text(markdown(results))
    print(json.dumps({"bench": "detection", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
