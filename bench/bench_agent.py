"""Agent overhead per step: GP fit + acquisition maximisation, at 10, 20 and 40 observations.

    .venv/bin/python bench/bench_agent.py [--observations 10 20 40] [--repeats 5] [--seed 0]

For each history size ``n`` a GP-UCB agent is told ``n`` points of a noisy smooth 10-d function
and its next ``ask()`` is timed (a fresh agent per repeat, each with its own seed, so no cached
proposal is reused). The split between fitting and acquisition is measured in the same run.
Prints one JSON object: medians (and min/max) in seconds per history size, as wall-clock and as
process CPU time (the agent is single-threaded, so CPU time is its cost on an idle core; wall
time also counts waiting for a core on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from swift_sampler.search.agents import create_agent

DIM = 10


def _history(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, n])
    points = rng.uniform(size=(n, DIM))
    scores = -np.sum((points - 0.3) ** 2, axis=1) + 0.05 * rng.normal(size=n)
    return points, scores


def time_step(n: int, seed: int, **kwargs) -> dict[str, float]:
    """Seconds of one GP-UCB ``ask()`` after ``n`` observations, and of its fit alone."""
    agent = create_agent("gp-ucb", dim=DIM, seed=seed, n_sobol=0, **kwargs)
    points, scores = _history(n, seed)
    for z, s in zip(points, scores):
        agent.tell(z, s)
    t0, c0 = time.perf_counter(), time.process_time()
    agent.ask()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    with threadpool_limits(limits=1, user_api="blas"):
        agent._fit(points, scores)  # same fit again, alone, to split the step
    fit, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"step_s": total, "fit_s": fit, "acquisition_s": max(0.0, total - fit),
            "step_cpu_s": cpu, "fit_cpu_s": fit_cpu, "acquisition_cpu_s": max(0.0, cpu - fit_cpu)}


def _median_at_40(results: dict, key: str) -> bool | None:
    return results["40"][key]["median"] < 2.0 if "40" in results else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import nevergrad  # noqa: F401  (import time is not agent overhead)

    time_step(5, args.seed)  # warm-up: lazy imports, first BLAS call
    results = {}
    for n in args.observations:
        runs = [time_step(n, args.seed + r) for r in range(args.repeats)]
        results[str(n)] = {
            key: {
                "median": round(statistics.median(r[key] for r in runs), 4),
                "min": round(min(r[key] for r in runs), 4),
                "max": round(max(r[key] for r in runs), 4),
            }
            for key in runs[0]
        }
    agent = create_agent("gp-ucb")
    report = {
        "benchmark": "agent_overhead",
        "agent": "gp-ucb",
        "settings": {k: v for k, v in agent.get_params().items() if k != "initial_points"},
        "repeats": args.repeats,
        "observations": results,
        "target": "step median < 2 s at 40 observations",
        "meets_target_wall": _median_at_40(results, "step_s"),
        "meets_target_cpu": _median_at_40(results, "step_cpu_s"),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version()},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
