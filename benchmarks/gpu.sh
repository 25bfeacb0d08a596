#!/usr/bin/env bash
# remat on a CUDA machine: allocator peaks vs remat's tracker and prediction, gradients, timings,
# and the CUDA test of the suite. Sized to finish in under 8 minutes on one H100/H200.
#   bash benchmarks/gpu.sh [OUTDIR]
# Uses the machine's own torch if it has CUDA; otherwise installs nothing and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
py="${PYTHON:-python3}"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$py" -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-info.txt"
timeout 420 "$py" benchmarks/gpu_check.py --out "$out/gpu-report.md"
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_measure.py -k cuda 2>&1 | tee "$out/gpu-tests.txt"
