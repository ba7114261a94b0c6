"""The noisy-CIFAR benchmark: Swift Sampler against the peers a practitioner would use.

One run carves a clean test split and a noisy train/val split from an image folder (the shared
CIFAR-10), trains one model with one recipe under every method (uniform, clean labels, oracle
mask, small-loss, cleanlab, SS and its ablations) for the same number of optimiser steps, and
reports clean-test top-1 with the share of the uniform -> oracle-mask and uniform -> clean gaps
that each method recovers. Nothing is chosen on the test split: the search scores on val.

Modules: ``config`` (settings, presets), ``stores`` (the noisy store and its clean twin),
``weights`` (per-image weights and subsets as loader stages), ``context`` (one seed: training,
timing, features), ``methods`` (one function per peer), ``ss`` (search, retrain, rank check),
``report`` (results.json, results.md), ``runner`` (seeds x methods, resumable, figures).

``cpu-quick`` sizes (two CPU cores, about an hour for the default methods): tiny-cnn, 20,000
noisy train / 5,000 noisy val / 10,000 clean test images, 12 epochs at batch 128; search 18
trials x 3 fine-tune epochs at 0.5x the recipe's lr; 4 crops per image; cleanlab 3-fold.
"""

from .config import DEFAULT_METHODS, METHODS, PRESETS, BenchConfig, resolve_bench
from .runner import run_benchmark

__all__ = ["DEFAULT_METHODS", "METHODS", "PRESETS", "BenchConfig", "resolve_bench", "run_benchmark"]
