"""Does our op keep its speed in a process that also runs ``torch.compile`` elsewhere?

Times the given cases (default: NCHW 32x64x56x56 and channels-last, float32,
all operations) twice in one process: first in a fresh process, then after an
Inductor-compiled conv-BN-ReLU network (torch's own layers, nothing of ours)
has been compiled and run, which loads Inductor's generated C++ kernels and
their OpenMP settings. Ratios torch/ours of both rounds are printed side by side.

    python benchmarks/bench_after_compile.py [--threads 1] [--shapes nchw:32x64x56x56,...]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from batchnorm.lab.bench import BenchOptions, parse_case, run


def _compile_something() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    compiled = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            compiled(torch.randn(4, 3, 16, 16)).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="nchw:32x64x56x56,channels-last:32x64x56x56,dense:60x100")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-after-compile"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [parse_case(text) for text in args.shapes.split(",")]
    rounds = {}
    for name in ("fresh", "after-compile"):
        if name == "after-compile":
            _compile_something()
            torch.set_num_threads(args.threads)
        print(f"--- {name} ---")
        rounds[name] = run(
            BenchOptions(shapes=cases, dtype=["float32"], repeats=7, out=args.out / name, json_path=None)
        )
    print("reports:", ", ".join(str(path) for path in rounds.values()))


if __name__ == "__main__":
    main()
