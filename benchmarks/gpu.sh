#!/usr/bin/env bash
# The kernel benchmark on a CUDA GPU, in under 5 minutes: ours against torch's, same process.
#
#   benchmarks/gpu.sh                 # writes runs/bench-gpu/bench-auto.json and bench-exact.json
#   OUT=/some/dir benchmarks/gpu.sh
#
# Uses the first python3 that imports a CUDA-enabled torch; otherwise creates
# runs/.venv-gpu (with the system's site packages) and installs torch into it.
# The package itself is used from src/ (no install needed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-gpu}
mkdir -p "$OUT"

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

PYTHON=${PYTHON:-python3}
if ! has_cuda_torch "$PYTHON"; then
    if [ ! -x runs/.venv-gpu/bin/python ]; then
        python3 -m venv --system-site-packages runs/.venv-gpu
    fi
    PYTHON=runs/.venv-gpu/bin/python
    if ! has_cuda_torch "$PYTHON"; then
        "$PYTHON" -m pip install --quiet torch numpy tqdm
    fi
    has_cuda_torch "$PYTHON" || { echo "gpu.sh: no CUDA device visible to torch" >&2; exit 2; }
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

# 1. Our dispatch (auto: the torch_ops primitives on CUDA), float32 and bfloat16, plus end-to-end steps: ~1 min.
timeout 150 "$PYTHON" benchmarks/bench_kernels.py --device cuda --dtype float32,bfloat16 --repeats 7 \
    --block-ms 10 --explain --end-to-end --json "$OUT/bench-auto.json" | tee "$OUT/bench-auto.txt" \
    || echo "gpu.sh: the auto run did not finish in its time slot" >&2

# 2. The exact (float64) backend forced, float32: what correctness costs on the device, ~1 min.
timeout 140 "$PYTHON" benchmarks/bench_kernels.py --device cuda --dtype float32 --kernel exact --repeats 7 \
    --block-ms 10 --json "$OUT/bench-exact.json" | tee "$OUT/bench-exact.txt" \
    || echo "gpu.sh: the exact run did not finish in its time slot" >&2
