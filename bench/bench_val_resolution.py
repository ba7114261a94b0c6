"""How finely the val split separates two trained models: paired differences and their noise.

    .venv/bin/python bench/bench_val_resolution.py --store STORE RUN_A RUN_B [RUN_C ...]

Each RUN is a run folder (or a checkpoint) trained on STORE; the first is the reference. Each
model is scored once on val (the labels every choice is made on, noisy where the store is) and
on test; for each later run against the reference it reports (JSON, last line):

- ``val_diff`` / ``test_diff``: the top-1 difference in points;
- ``val_diff_se`` / ``test_diff_se``: its sampling standard error over the split's images,
  ``sqrt(var(c_b - c_a) / n)`` with ``c`` the per-image 0/1 correctness: the noise a choice
  made on this split carries even when training is perfectly repeatable (a fixed val split is
  one sample of images; seed repeats on the same split do not measure it);
- ``val_true_diff``: the same difference on the val images' original labels (diagnostics only,
  when the store records them): what a clean val split of the same size would have said;
- ``val_prob_diff`` / ``val_prob_diff_se``: the same for the mean predicted probability of the
  val label (the search's ``prob`` score), in points of probability;
- ``disagree``: the share of val images on which the two models' predictions differ.

Signal over noise (``diff / diff_se``) says which score a choice between the two should use.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from swift_sampler.storage import StoreLayout, literal, read_view
from swift_sampler.train.checkpoint import load_model
from swift_sampler.train.evaluate import predict


def checkpoint_of(path: Path) -> Path:
    return path / "checkpoint.pt" if path.is_dir() else path


def original_labels(store: Path, split: str, index: np.ndarray) -> np.ndarray | None:
    """The split's original labels by sample index (diagnostics only), or None without them."""
    if not StoreLayout(store).samples.is_file():
        return None
    t = read_view(store, "samples", ["index", "true_label"], where=f"split = {literal(split)}")
    lookup = dict(zip(t.column("index").to_pylist(), t.column("true_label").to_pylist()))
    if any(lookup.get(int(i)) is None for i in index):
        return None
    return np.array([lookup[int(i)] for i in index], np.int64)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean difference b - a (per-image 0/1 or probabilities) in points, and its standard error
    over the images."""
    d = np.asarray(b, float) - np.asarray(a, float)
    return 100 * float(d.mean()), 100 * float(d.std(ddof=1) / math.sqrt(len(d)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("runs", type=Path, nargs="+", help="run folders or checkpoints; the first is the reference")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs: a reference and one to compare")
    missing = [str(checkpoint_of(r)) for r in args.runs if not checkpoint_of(r).is_file()]
    if missing:
        p.error(f"no checkpoint at {', '.join(missing)}")

    scored = []
    for run in args.runs:
        model, _ = load_model(checkpoint_of(run))
        row = {"run": str(run)}
        for split in ("val", "test"):
            out = predict(args.store, model, split, workers=args.workers)
            logits = out["logits"].astype(np.float64)
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            pred = logits.argmax(1)
            row[split] = {"pred": pred, "correct": pred == out["label"], "index": out["index"],
                          "label_prob": prob[np.arange(len(pred)), out["label"]]}
        scored.append(row)

    ref = scored[0]
    truth = original_labels(args.store, "val", ref["val"]["index"])
    runs, pairs = [], []
    for row in scored:
        entry = {"run": row["run"], "val_top1": 100 * float(row["val"]["correct"].mean()),
                 "test_top1": 100 * float(row["test"]["correct"].mean())}
        if truth is not None:
            entry["val_true_top1"] = 100 * float((row["val"]["pred"] == truth).mean())
        runs.append(entry)
    for row in scored[1:]:
        vd, vse = paired(ref["val"]["correct"], row["val"]["correct"])
        pd, pse = paired(ref["val"]["label_prob"], row["val"]["label_prob"])
        td, tse = paired(ref["test"]["correct"], row["test"]["correct"])
        pair = {"reference": ref["run"], "run": row["run"], "val_diff": vd, "val_diff_se": vse,
                "test_diff": td, "test_diff_se": tse, "val_prob_diff": pd, "val_prob_diff_se": pse,
                "disagree": float((ref["val"]["pred"] != row["val"]["pred"]).mean())}
        if truth is not None:
            pair["val_true_diff"], pair["val_true_diff_se"] = paired(ref["val"]["pred"] == truth,
                                                                      row["val"]["pred"] == truth)
        pairs.append(pair)
    for entry in runs:
        print(f"{entry['run']}: val {entry['val_top1']:.2f}  test {entry['test_top1']:.2f}", file=sys.stderr)
    for pair in pairs:
        print(f"{pair['run']} - reference: val {pair['val_diff']:+.2f} ± {pair['val_diff_se']:.2f}  "
              f"test {pair['test_diff']:+.2f} ± {pair['test_diff_se']:.2f}  "
              f"val prob {pair['val_prob_diff']:+.2f} ± {pair['val_prob_diff_se']:.2f}  "
              f"disagree {pair['disagree']:.1%}", file=sys.stderr)
    print(json.dumps({"store": str(args.store), "val_count": int(len(ref["val"]["correct"])),
                      "runs": runs, "pairs": pairs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
