#!/usr/bin/env bash
# Nsight Systems timeline of HybridLM train steps (profiles/train_step.py) with NVTX ranges
# step / data / forward / forward/T / forward/M / backward / optimizer, then the markdown summary.
#
#   profiles/nsys_train_step.sh [PATTERN] [LENGTH] [STEPS]      # defaults: hybrid 8192 5
#
# Only the steps after warm-up are captured (cudaProfilerStart/Stop in the driver). Writes
# profiles/<device>/nsys_<pattern>_L<length>.{nsys-rep,*_cuda_gpu_kern_sum.csv,*_nvtx_sum.csv,
# _summary.md}. Needs nsys >= 2023.1 (report names cuda_gpu_kern_sum, nvtx_sum).
set -euo pipefail

PATTERN=${1:-hybrid}
LENGTH=${2:-8192}
STEPS=${3:-5}
PY=${PY:-.venv/bin/python}

cd "$(dirname "$0")/.."
source profiles/common.sh
require_profiler nsys
set_device_out
STEM=$OUT/nsys_${PATTERN}_L${LENGTH}
mkdir -p "$OUT"

nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true --output "$STEM" \
    "$PY" -m profiles.train_step --pattern "$PATTERN" --length "$LENGTH" --steps "$STEPS"
nsys stats --report cuda_gpu_kern_sum,nvtx_sum --format csv --force-export=true --output "$STEM" "$STEM.nsys-rep"
"$PY" -m profiles.summarize --format nsys --device "$DEVICE" \
    --workload "$PATTERN L=$LENGTH, $STEPS steps after warm-up" \
    --kernels "${STEM}_cuda_gpu_kern_sum.csv" --ranges "${STEM}_nvtx_sum.csv" --out "${STEM}_summary.md"
