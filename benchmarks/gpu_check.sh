#!/usr/bin/env bash
# The prepared GPU check of issue 11 (under 8 minutes on one H200): exactness, eager and compiled
# decode/prefill speed on a random Llama-3-8B shape in bf16, router-only vs full training step on
# a 1B shape. Results: benchmarks/results/gpu_check.json (each section written as it finishes).
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_ARGS="--tiny --device cpu" bash benchmarks/gpu_check.sh   # the CPU test at a toy shape
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
# 470 s: the sections (and compiled cells) already finished are kept if the compiled one runs out of time.
timeout 470 "$PY" benchmarks/gpu_check.py ${GPU_CHECK_ARGS:-} "$@"
echo "gpu_check: exit $?"
