#!/usr/bin/env bash
# One device call: our correctness + timings, then the peers in the same session.
#   carry: .peers (copies of ../shared/tools), .peer-wheels (from .peers/peer_wheels.sh)
# Writes everything under $OUT. Usage: bash benchmarks/diag/run_device.sh
#   [ours|peers|all|pending|pending_na|soft_cap]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
what=${1:-all}
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee $OUT/gpu.txt
if [ "$what" = ours ] || [ "$what" = all ] || [ "$what" = ours+models ]; then
  timeout 420 python3 -m benchmarks.bench_gpu --suite ${SUITES:-check,perf} --iters 10 \
    --out $OUT/ours.json 2>&1 | grep '^{' | tee $OUT/ours.log
fi
if [ "$what" = peers ] || [ "$what" = all ]; then
  (cd $OUT && timeout 200 python3 $OLDPWD/.peers/anchor_probe.py > $OUT/anchor_dense.log 2>&1)
  (cd $OUT && timeout 150 python3 $OLDPWD/.peers/anchor_probe_sparse.py > $OUT/anchor_sparse.log 2>&1)
  if ls .peer-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/peers .peer-wheels/*.whl
    (cd $OUT && PYTHONPATH=/tmp/peers:$OLDPWD/.peers/stubs timeout 200 python3 \
      $OLDPWD/.peers/tokamax_probe.py > $OUT/tokamax.log 2>&1)
  fi
  tail -n 40 $OUT/anchor_dense.log $OUT/anchor_sparse.log $OUT/tokamax.log 2>/dev/null | grep -v "^$"
fi
if [ "$what" = models ] || [ "$what" = all ] || [ "$what" = ours+models ]; then
  timeout 300 python3 -m benchmarks.bench_models --out $OUT/models.json 2>&1 | grep '^{'
fi
if [ "$what" = pending ]; then
  # Queued by the twenty-seventh session (docs/performance.md, 2026-12-06): causal S=4096 at
  # head_dim 64, fused since (16.5 Q blocks per KV block; the CLI showed 0.614 vs 0.584 ms
  # across two calls), A/B inside one call; then the 96-column defaults (4 Q/dO slots)
  # through the CLI with the peers.
  timeout 240 python3 -m benchmarks.diag.diag_d64_backward --cases causal,window --seq 4096 \
    --out $OUT/d64_s4096.json 2>&1 | grep '^{'
  timeout 300 python3 -m benchmarks run --suite dense,causal,window,gna2d --heads 12 \
    --head-dim 96 --peers --out $OUT/hd96 2>&1 | grep -v Warning | tail -n 20
fi
if [ "$what" = pending_na ]; then  # a second call: the fused form on the shorter
  # neighborhood lists at 64 (kept on the two kernels below `FUSED_MIN_ENTRIES_64_NA`)
  timeout 500 python3 -m benchmarks.diag.diag_d64_backward --cases na2d,na3d_strided \
    --out $OUT/d64_na_short.json 2>&1 | grep '^{'
fi
if [ "$what" = soft_cap ]; then  # logits_soft_cap's cost (a second call after "pending")
  timeout 300 python3 -m benchmarks.diag.diag_soft_cap --out $OUT/soft_cap.json 2>&1 | grep '^{'
fi
