"""Benchmark: tables + transform (and tau) for N synthetic rows; one fresh process per run.

Prints one JSON object: medians over runs of wall time, process CPU time (less sensitive to
other load on a shared machine) and peak RSS (ru_maxrss of the child).
Usage: python bench/bench_tables.py [--rows 10240000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from swift_sampler.pipeline.sampler.function import Sampler
from swift_sampler.pipeline.sampler.table_build import build_tables
n = int(sys.argv[1])
rng = np.random.default_rng(0)
loss = rng.gamma(0.7, 1.0, n).astype(np.float32)
er = (rng.beta(5, 2, n) * 2.3).astype(np.float32)
w = (np.exp(0.5 * loss) * rng.lognormal(0, 0.6, n)).astype(np.float32)
c0 = time.process_time()
t0 = time.perf_counter()
tab = build_tables(loss, er, w)
t1 = time.perf_counter()
c1 = time.process_time()
t = tab.transform_raw(loss, er, 0.6, -0.8, "cgf")
t2 = time.perf_counter()
c2 = time.process_time()
s = Sampler((0, 0.2, 0.5, 0.8, 1), (0.1, 1, 0.6, 0.2, 0), 0.6, -0.8, "cgf", tab.subset(0.6, -0.8))
f1, f2 = tab.feature_cdf("loss", loss), tab.feature_cdf("entropy_r", er)
t3 = time.perf_counter()
tau = s.tau_from_cdf(f1, f2)
t4 = time.perf_counter()
tau_raw = s.tau(loss, er)
t5 = time.perf_counter()
print(json.dumps({"build_s": t1 - t0, "transform_s": t2 - t1, "build_cpu_s": c1 - c0,
                  "transform_cpu_s": c2 - c1, "points": tab.points["cgf"].shape[1], "tau_from_cdf_s": t4 - t3,
                  "tau_raw_s": t5 - t4, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_240_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD, str(args.rows)], check=True,
                                      capture_output=True, text=True).stdout) for _ in range(args.runs)]
    out = {"rows": args.rows, "runs": args.runs,
           **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
           "tables_plus_transform_s": statistics.median(r["build_s"] + r["transform_s"] for r in runs),
           "targets": {"tables_plus_transform_s": 60, "peak_rss_mb": 4096, "tau_s": 1.0}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
