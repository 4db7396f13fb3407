"""Training-step speed of the paper's MLP at 1 and 2 torch threads, each in its own process.

Usage: python benchmarks/bench_threads.py [--steps 1000] [--busy]

``--busy`` runs a CPU-bound Python loop in a second process during the
measurement, as on a shared machine. Prints median milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from batchnorm.lab.models import build_model
threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.set_flush_denormal(True)
torch.manual_seed(0)
model = build_model("mlp:784-100-100-100-10", "sigmoid", "batch", "before", "normal:0.01", seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
x, y = torch.rand(60, 1, 28, 28), torch.randint(0, 10, (60,))
times = []
for step in range(steps + 50):
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step >= 50:
        times.append(time.perf_counter() - start)
times.sort()
median, p90 = times[len(times) // 2], times[int(0.9 * len(times))]
print(json.dumps({"threads": threads, "median_ms": 1e3 * median, "p90_ms": 1e3 * p90}))
"""


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--busy", action="store_true", help="load one core with another process meanwhile")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    busy = None
    if args.busy:
        busy = multiprocessing.Process(target=_spin, args=(3600,), daemon=True)
        busy.start()
    results: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(args.rounds):
            for threads in (1, 2):
                output = subprocess.run(
                    [sys.executable, "-c", CHILD, str(threads), str(args.steps)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                results[threads].append(json.loads(output)["median_ms"])
    finally:
        if busy is not None:
            busy.terminate()
    for threads, values in results.items():
        print(f"{threads} thread(s): median {statistics.median(values):.3f} ms/step over {args.rounds} rounds {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
