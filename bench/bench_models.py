"""Benchmark: training and inference images/s of the models at 32x32 on this machine.

One SGD step (Nesterov, as the trainer) on uint8 batches, default layout vs channels-last,
median over ``--steps`` timed steps after ``--warmup``; prints one JSON object.

    .venv/bin/python bench/bench_models.py [--models tiny-cnn,resnet18] [--batch-size 256]
        [--threads 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def step_times(model, x, y, steps: int, warmup: int, train: bool) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times)


def main() -> None:
    from swift_sampler.train.models import count_parameters, create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-cnn,resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"bench": "models", "batch_size": args.batch_size, "threads": args.threads,
           "image": 32, "models": {}}
    for name in args.models.split(","):
        model = create_model(name, 10)
        x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 10, (args.batch_size,))
        row = {"parameters": count_parameters(model)}
        for layout in ("default", "channels_last"):
            m, xx = model.train(), x
            if layout == "channels_last":
                m = model.to(memory_format=torch.channels_last)
                xx = x.contiguous(memory_format=torch.channels_last)
            row[f"train_{layout}"] = round(step_times(m, xx, y, args.steps, args.warmup, True), 1)
            row[f"infer_{layout}"] = round(step_times(m.eval(), xx, y, args.steps, args.warmup,
                                                      False), 1)
        out["models"][name] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
