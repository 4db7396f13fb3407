#!/usr/bin/env bash
# The GPU checks in one script, in about 5 minutes on a CUDA machine: the CUDA tests, then the kernel
# benchmark (ours against torch's, same process), results written under benchmarks/results/gpu/.
#
#   benchmarks/gpu.sh                 # results in benchmarks/results/gpu/
#   OUT=/some/dir benchmarks/gpu.sh
#
# Uses the first python3 that imports a CUDA-enabled torch; otherwise creates runs/.venv-gpu (with the
# system's site packages) and installs torch into it. Installs what the tests need (pytest, hypothesis,
# triton) when missing. The package itself is used from src/ (no install needed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
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
"$PYTHON" -c "import pytest, hypothesis, triton" 2>/dev/null \
    || "$PYTHON" -m pip install --quiet pytest hypothesis triton tqdm optuna
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" | tee "$OUT/device.txt"

# 1. The CUDA tests: no host synchronization, CUDA-graph capture and replay, the Triton kernels compiled
#    (not interpreted) against float64, the ported PyTorch tests' CUDA cases, --device on every verb: ~2 min.
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py \
    tests/test_torch_ported.py tests/test_functional.py tests/test_modules.py tests/cli/test_device.py \
    -k "cuda or triton or CUDA or device" 2>&1 | tail -40 | tee "$OUT/cuda-tests.txt" \
    || echo "gpu.sh: the CUDA tests failed or did not finish in their time slot" >&2

# 2. The bench suite on the GPU (the dispatch: Triton kernels where plan() picks them), float32 and
#    bfloat16, interleaved medians, plus end-to-end steps: ~2 min.
timeout 150 "$PYTHON" benchmarks/bench_kernels.py --device cuda --dtype float32,bfloat16 --repeats 7 \
    --block-ms 10 --explain --end-to-end --json "$OUT/bench-auto.json" | tee "$OUT/bench-auto.txt" \
    || echo "gpu.sh: the auto run did not finish in its time slot" >&2

# 3. PyTorch operations forced (no Triton), float32: what the Triton kernels add, ~1 min.
timeout 90 "$PYTHON" benchmarks/bench_kernels.py --device cuda --dtype float32 --kernel torch --repeats 5 \
    --block-ms 10 --json "$OUT/bench-torch.json" | tee "$OUT/bench-torch.txt" \
    || echo "gpu.sh: the torch-kernels run did not finish in its time slot" >&2
echo "gpu.sh: results in $OUT"
