#!/usr/bin/env bash
# Nsight Compute with per-instruction stall sampling (SourceCounters) on one launch each of
# the Hopper forward (dense S=4096), the fused backward (dense S=4096, dQ reduce-added) and
# the two-kernel dK/dV kernel (2-D NA 128² k33): where the warps wait, instruction by
# instruction, and the SASS those samples fall on. Writes under $OUT: <case>.txt (details
# page), <case>-sass.csv (source page, SASS with samples per stall reason), <case>.ncu-rep.
#   bash benchmarks/diag/profile_sources.sh [fwd] [fused] [na2d]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)}
$NCU --version | tail -1
cases=${*:-fwd fused na2d}
for c in $cases; do
  case $c in
    fwd) k=regex:mosaic_gpu; prog="benchmarks.diag.profile_fwd ours" ;;
    fused) k=regex:sparse_attention_bwd; prog="benchmarks.diag.profile_dkv dense4096_fused" ;;
    na2d) k=regex:sparse_attention_bwd; prog="benchmarks.diag.profile_dkv na2d" ;;
    *) echo "unknown case $c"; continue ;;
  esac
  timeout 200 $NCU --clock-control none -k $k -c 1 --import-source no \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --section LaunchStats \
    --section MemoryWorkloadAnalysis --section SourceCounters \
    -f -o $OUT/$c python3 -m $prog > $OUT/$c-run.log 2>&1
  tail -n 3 $OUT/$c-run.log
  $NCU -i $OUT/$c.ncu-rep --page details > $OUT/$c.txt 2>&1
  $NCU -i $OUT/$c.ncu-rep --page source --csv --print-source sass > $OUT/$c-sass.csv 2>&1 \
    || $NCU -i $OUT/$c.ncu-rep --page source --csv > $OUT/$c-sass.csv 2>&1
  $NCU -i $OUT/$c.ncu-rep --page raw --csv > $OUT/$c-raw.csv 2>&1
  grep -E "Duration|Registers Per|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Thr" \
    $OUT/$c.txt | head -8
  wc -c $OUT/$c-sass.csv; head -c 600 $OUT/$c-sass.csv; echo
done
