#!/usr/bin/env bash
# One device call whose work depends on the card that came (thirty-second session): an H200
# runs the README's headline with its peers, then MoBA timed as Flex's row; an H100 the
# Hopper backward's real-size gradient checks, then FUSED_QUARTERS against the defaults.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
if [[ "$name" == *H200* ]]; then
  timeout 400 python3 -m benchmarks run --suite \
    dense,causal,routing,window,gna2d,gna3d,strided,gna1d,blocksparse --peers --plot \
    --out $OUT/head 2>&1 | grep -E "^\|" | tail -40
  timeout 150 python3 -m benchmarks.bench_routing --sections moba --out $OUT/moba.json 2>&1 \
    | grep '^{' | tail -12
else
  timeout 250 python3 -m benchmarks.bench_hopper_backward --sections check \
    --check-impl mosaic-bwd --out $OUT/check-hopper.json 2>&1 | grep '^{' | tail -20
  timeout 290 python3 -m benchmarks.diag.diag_backward_forms --cases gna2d,gna3d,blocksparse \
    --variants kernel,fused,fused_quarters --out $OUT/fused-quarters.json 2>&1 | grep '^{'
fi
