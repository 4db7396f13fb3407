"""Kernel and end-to-end benchmark: our batch norm against PyTorch's, same process, interleaved.

The logic lives in :mod:`batchnorm.lab.bench` and the options in
:mod:`batchnorm.cli.bench`, so that ``batchnorm bench`` runs the same code;
this script is the same command without the verb:

    python benchmarks/bench_kernels.py --quick --explain
    python benchmarks/bench_kernels.py --end-to-end --json runs/bench/bench.json
"""

from __future__ import annotations

import sys

from batchnorm.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
