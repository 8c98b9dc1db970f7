#!/usr/bin/env bash
# One device call: our correctness + timings, then the peers in the same session.
#   carry: .peers (copies of ../shared/tools), .peer-wheels (from .peers/peer_wheels.sh)
# Pass JSA_COMMIT=<the checkout's commit> (the device's copy has a stale git directory).
# Writes everything under $OUT. Usage: bash benchmarks/diag/run_device.sh
#   [ours|peers|all|models|ours+models|pending|pending2|pending3|pending4|pending5|routing|lazy]
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
if [ "$what" = pending4 ]; then
  # Ran on an H100 in the thirty-fifth session (docs/experiments/h100-2026-12-07-gqa-forms
  # .json; queued in the thirty-third, out of device time): MoBA at GQA 16/4 with the runtime
  # map's dK/dV items per group, per query head (the default there since b7e2557) and per
  # query head with whole lists (`work_items.HEAD_CHUNK="whole"`), two rounds, MHA beside.
  timeout 300 python3 -m benchmarks.diag.diag_gqa_routing --forms auto+group,auto+head,auto+headwhole \
    --rounds 2 --mha --out $OUT/gqa-forms.json 2>&1 | grep '^{' | tail -16
fi
if [ "$what" = pending5 ]; then
  # Ran on an H100 in the thirty-fifth session (benchmarks/results/h100-2026-12-07-small-
  # grids.json): neighborhoods on grids smaller than a tile (7×7 k7, 8×8
  # k3, 2×5×5), the least-padding tiles against the (1, 128) row tiles chosen before,
  # gradients against float32 XLA.
  timeout 200 python3 -m benchmarks.diag.diag_small_grids --out $OUT/small-grids.json 2>&1 \
    | grep '^{' | tail -12
fi
if [ "$what" = routing ]; then
  # Queued in the thirty-seventh session (no machine started; carry .peers): issue #23 in one
  # call, our MoBA rows with their GPU gradient checks, then torch Flex's MoBA, 3-D NA and
  # cuDNN's window (`anchor_probe_sparse.py`) on the same machine.
  timeout 330 python3 -m benchmarks.bench_routing --sections check,perf,video \
    --out $OUT/routing.json 2>&1 | grep '^{' | cut -c1-400
  (cd $OUT && timeout 170 python3 $OLDPWD/.peers/anchor_probe_sparse.py > $OUT/anchor_sparse.log 2>&1)
  grep -v "^$" $OUT/anchor_sparse.log | tail -15
fi
if [ "$what" = lazy ]; then
  # Queued in the thirty-ninth session (no machine started: four failed starts, then no more
  # loans): FlashAttention-4's conditional rescale in the Hopper forward
  # (`attention_fwd.LAZY_RESCALE`, off), with and without its per-thread branch, against the
  # running max every step; the small checks against float32 XLA first.
  # `benchmarks.diag.decide_lazy` prints the median ratios and leaves bench-out/lazy_on where
  # the form wins; a `pending` call on the same machine, while it is still held (30 s idle),
  # then runs with it switched on (on a fresh machine: set LAZY_RESCALE = 8.0 in the checkout).
  mkdir -p bench-out; rm -f bench-out/lazy_on
  timeout 520 python3 -m benchmarks.diag.diag_fwd_forms --out $OUT --switch LAZY_RESCALE \
    --forms every=none,lazy8=8,plain8=8/plain \
    --cases dense,causal,window,gna2d,gna3d,blocksparse,d64 --fwd-bwd dense,window \
    --rounds 2 2>&1 | grep -E '^\{|Error' | cut -c1-1500 | tee $OUT/lines.jsonl
  python3 -m benchmarks.diag.decide_lazy $OUT/lines.jsonl && touch bench-out/lazy_on
fi
if [ "$what" = pending ]; then
  # Queued (no H200 came in the thirty-first to thirty-sixth sessions; the thirty-third ran it
  # on an H100 at 2a193fa): the README's H200 headline with cuDNN, torch Flex and (carry
  # .peer-wheels) tokamax, then MoBA timed as Flex's row (its runtime map built outside the
  # timing).
  if ls .peer-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/peers .peer-wheels/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/peers:$PWD/.peers/stubs
  fi
  if [ -f bench-out/lazy_on ]; then  # left by a `lazy` call that found the form faster
    sed -i 's/^LAZY_RESCALE = None$/LAZY_RESCALE = 8.0/' pallas_kernels/gpu/mosaic_gpu/attention_fwd.py
    grep -n '^LAZY_RESCALE' pallas_kernels/gpu/mosaic_gpu/attention_fwd.py | tee $OUT/lazy.txt
  fi
  timeout 400 python3 -m benchmarks run --suite \
    dense,causal,routing,window,gna2d,gna3d,strided,gna1d,blocksparse --peers --plot \
    --out $OUT/head 2>&1 | grep -E "^\|" | tail -40
  timeout 150 python3 -m benchmarks.bench_routing --sections moba --out $OUT/moba.json 2>&1 \
    | grep '^{' | tail -12
fi
if [ "$what" = pending3 ]; then
  # Real-size gradient checks against float32 XLA of the fused form forced ("split" dQ) on
  # every case, neighborhoods' MMA bias among them (ran on an H100 in the thirty-third
  # session: within 2.5e-3, docs/experiments/h100-2026-12-07-check-fused.json).
  timeout 200 python3 -m benchmarks.bench_hopper_backward --sections check \
    --check-impl mosaic-split-dq --out $OUT/check-fused.json 2>&1 | grep '^{' | tail -40
fi
if [ "$what" = pending2 ]; then
  # The head-dim table's 64/96/128 rows with cuDNN, causal and dense (S=8192, B=2, H=16); ran
  # on an H100 in the thirty-third session (docs/results.md), the H200 rows not re-run.
  timeout 280 python3 -m benchmarks.diag.diag_head_dim --head-dims 64,96,128 --no-triton \
    --out $OUT/head-dim-causal.json 2>&1 | grep '^{'
  timeout 200 python3 -m benchmarks.diag.diag_head_dim --head-dims 64,96 --no-triton --dense \
    --out $OUT/head-dim-dense.json 2>&1 | grep '^{'
fi
