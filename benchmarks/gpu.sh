#!/usr/bin/env bash
# The GPU checks and benchmarks of the throughput work in one command, on a machine with CUDA and cellstrata
# installed editable with its test extras (pip install -e '.[test]'):  bash benchmarks/gpu.sh [RESULTS_DIR]
#   1. CUDA tests: varlen attention vs padded for every family, the auto token budget, memory vs depth, kernels
#   2. python -m benchmarks.device_sprint: (a) forward / (b) cellstrata / (c) peers in one process per model (~3 min)
#   3. python -m benchmarks.throughput --device cuda: the full suite with the peers' batch sweep (~5-10 min)
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT"
status=0
python -m pytest tests/engine/test_packed_cuda.py tests/kernels -q -p no:cacheprovider || status=1
python -m benchmarks.device_sprint --device cuda --results "$OUT" \
  --shapes tahoe-x1:1b=3000,scgpt:whole-human=20000,geneformer:v2-104m=20000,tahoe-x1:70m=10000,geneformer:tiny=100000 \
  || status=1
python -m benchmarks.throughput --device cuda --results "$OUT" || status=1
exit $status
