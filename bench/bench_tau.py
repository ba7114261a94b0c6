"""Benchmark: tau for N crops (default 10,240,000), from precomputed cdf columns and from raw
features, float32 fast path vs the float64 ``precise`` chain in the same process.

The tables are built from the first ``--table-rows`` crops (tau's cost does not depend on how
many rows the knots came from). Prints one JSON object with medians over ``--runs`` calls.
Usage: python bench/bench_tau.py [--rows 10240000] [--runs 5] [--table-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np

from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_build import build_tables


def timed(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_240_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--table-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.rows
    loss = rng.gamma(0.7, 1.0, n).astype(np.float32)
    er = (rng.beta(5, 2, n) * 2.3).astype(np.float32)
    w = (np.exp(0.5 * loss) * rng.lognormal(0, 0.6, n)).astype(np.float32)
    m = min(args.table_rows, n)
    tab = build_tables(loss[:m], er[:m], w[:m], angles=720)
    s = Sampler((0, 0.2, 0.5, 0.8, 1), (0.1, 1, 0.6, 0.2, 0), 0.6, -0.8, "cgf", tab.subset(0.6, -0.8))
    f1 = tab.feature_cdf("loss", loss).astype(np.float32)
    f2 = tab.feature_cdf("entropy_r", er).astype(np.float32)
    s.tau_from_cdf(f1[:10], f2[:10])  # builds the composed H(T(.)) once (cached on the sampler)
    out = {"rows": n, "runs": args.runs, "table_rows": m}
    cases = {
        "tau_from_cdf": lambda: s.tau_from_cdf(f1, f2),
        "tau_raw": lambda: s.tau(loss, er),
        "tau_from_cdf_precise": lambda: s.tau_from_cdf(f1, f2, precise=True),
        "tau_raw_precise": lambda: s.tau(loss, er, precise=True),
    }
    for name, fn in cases.items():
        med, times = timed(fn, args.runs)
        out[f"{name}_s"] = med
        out[f"{name}_all_s"] = [round(t, 4) for t in times]
    fast, precise = s.tau(loss, er), s.tau(loss, er, precise=True)
    diff = np.abs(fast.astype(np.float64) - precise)
    out["fast_vs_precise_max_abs"] = float(diff.max())
    out["fast_vs_precise_share_over_1e-4"] = float((diff > 1e-4).mean())
    out["speedup_from_cdf"] = out["tau_from_cdf_precise_s"] / out["tau_from_cdf_s"]
    out["speedup_raw"] = out["tau_raw_precise_s"] / out["tau_raw_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["target_s"] = 1.0
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
