#!/usr/bin/env bash
# The CPU kernel benchmark: our batch norm against torch's, same process, interleaved.
#   benchmarks/run.sh              full suite, float32 and bfloat16, plus end-to-end steps (~5 min)
#   benchmarks/run.sh --quick      float32 only, short repeats (~1 min once compiled)
# Extra arguments go to `batchnorm bench` (see `batchnorm bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    make install
fi
exec "$PYTHON" benchmarks/bench_kernels.py --threads "${BATCHNORM_THREADS:-1}" --explain --end-to-end \
    --out "${OUT:-runs/bench}" "$@"
