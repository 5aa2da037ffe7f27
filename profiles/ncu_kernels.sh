#!/usr/bin/env bash
# Nsight Compute on every refrag Triton kernel launched in one HybridLM train step (after
# warm-up, inside the driver's "profile" NVTX range): speed of light (memory and compute
# throughput vs the device peak), occupancy (achieved, theoretical, limiting resource),
# launch statistics and memory workload; then the per-kernel markdown summary.
#
#   profiles/ncu_kernels.sh [PATTERN] [LENGTH]      # defaults: hybrid 8192
#
# Writes profiles/<device>/ncu_<pattern>_L<length>.{ncu-rep,_raw.csv,_summary.md}. Each launch
# is replayed once per metric pass, so expect minutes. Needs permission to read GPU counters
# (root, or NVreg_RestrictProfilingToAdminUsers=0).
set -euo pipefail

PATTERN=${1:-hybrid}
LENGTH=${2:-8192}
PY=${PY:-.venv/bin/python}

cd "$(dirname "$0")/.."
source profiles/common.sh
require_profiler ncu
set_device_out
STEM=$OUT/ncu_${PATTERN}_L${LENGTH}
KERNELS=$($PY -m profiles.summarize --kernel-regex)
METRICS=$($PY -c "from profiles.summarize import NCU_METRICS, OCCUPANCY_LIMITS as O; \
print(','.join([*NCU_METRICS.values(), *O.values()]))")
mkdir -p "$OUT"

ncu --nvtx --nvtx-include "profile/" --kernel-name "$KERNELS" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --metrics "$METRICS" --force-overwrite --export "$STEM" \
    "$PY" -m profiles.train_step --pattern "$PATTERN" --length "$LENGTH" --steps 1
ncu --import "$STEM.ncu-rep" --csv --page raw > "${STEM}_raw.csv"
"$PY" -m profiles.summarize --device "$DEVICE" --workload "Triton kernels of one $PATTERN L=$LENGTH step" \
    --ncu "${STEM}_raw.csv" --out "${STEM}_summary.md"
