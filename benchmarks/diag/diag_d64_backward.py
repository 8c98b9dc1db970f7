"""The Hopper backward at head_dim 64 (ViT-B's 12 heads, B=2): where the benchmark CLI found
dense and causal training at S=16384 8-9% behind cuDNN (H100, 2026-12-06,
benchmarks/results/h100-2026-12-06-hd64.json). Variants, interleaved over two rounds, fwd /
fwd+bwd ms, gradients against the first's:

- ``kernel``: dQ its own kernel over 2 Q/dO slots (the default at 64 columns before this
  diagnostic; since, on short lists only);
- ``fused``: dQ reduce-added by the dK/dV kernel, each warpgroup its own keys' share
  (``backward_dq="own"``: 5 matmuls per block pair instead of 7; at 64 columns the dK/dV
  accumulators leave room for it without spills);
- ``kernel_stages4``: the two kernels with 4 Q/dO slots (a slot is half the bytes of 128
  columns');
- ``fused_stages4``: both (the default at 64 columns on masks with long lists since
  2026-12-06: `policy.FUSED_MIN_ENTRIES_64`, `FUSED_STAGES_64`; at 96 the two kernels
  over 4 slots, `STAGES_96`);
- ``default``: what `backward_dq=None` picks with the module's slots.

The variants set the form and slots explicitly, so they stay what they say. ``--head-dim``
(64 by default; other widths take "own" too), the cases ``na3d`` (3-D 16×64² k8×16², B=1),
``na2d`` (128² k33, B=2) and ``na3d_strided`` (stride 4×8×8), and ``--seq`` (the 1-D cases'
length): measured 2026-12-06 (docs/performance.md). A variant that does not compile (the
fused form over 4 slots beside the MMA-bias tables at 96) is recorded as its error.
cuDNN beside dense and causal, and a gradient check of ``fused`` against float32 XLA at a
smaller size (S=2048, or a smaller grid for the neighborhoods).

    python -m benchmarks.diag.diag_d64_backward --out x.json [--cases dense,causal,window,lm,na3d,na3d_strided,na2d]
        [--head-dim 64] [--seq 16384]
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import policy

from . import Rows, case_parser, interleaved_vs_first
from ..bench_gpu import fwd_bwd, inputs, rel_errors

SEQ = {"dense": masks.full(), "causal": masks.causal(),
       "window": masks.causal() & masks.sliding_window(2047),
       "lm": masks.causal() & (masks.sliding_window(511) | masks.sink(4))}
# Neighborhoods: (spatial, kernel, stride, batch, the gradient check's spatial shape).
NA = {"na3d": ((16, 64, 64), (8, 16, 16), 1, 1, (8, 32, 32)),  # the headline's 3-D
      "na3d_strided": ((16, 64, 64), (8, 16, 16), (4, 8, 8), 1, (8, 32, 32)),
      "na2d": ((128, 128), (33, 33), 1, 2, (64, 64))}
B, S, H = 2, 16384, 12
DEFAULTS = (policy.STAGES, policy.FUSED_STAGES, policy.FUSED_STAGES_64,
            policy.STAGES_96)


def _set_stages(*stages: int):
  """Q/dO slots of the two-kernel form, the fused form, the fused form at 64 columns, the
  two-kernel form at 96 columns."""
  (policy.STAGES, policy.FUSED_STAGES, policy.FUSED_STAGES_64,
   policy.STAGES_96) = stages
  ops._make_core.cache_clear()
  jax.clear_caches()


def _case(name: str, d: int, seq: int = S):
  """(fn(dq form) -> fn(q, k, v, backend), q shape at full size, q shape of the check)."""
  if name in NA:
    spatial, kernel, stride, batch, small = NA[name]
    run = lambda dq, backend="mosaic_gpu": (lambda q, k, v: jsa.na(
        q, k, v, kernel, stride=stride, backend=backend,
        config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq) if dq else None))
    return run, (batch, *spatial, H, d), (1, *small, 4, d)
  mask = SEQ[name]
  run = lambda dq, backend="mosaic_gpu": (lambda q, k, v: jsa.attention(
      q, k, v, mask, backend=backend,
      config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq) if dq else None))
  return run, (B, seq, H, d), (1, 2048, 4, d)


def main():
  parser = case_parser("dense,causal")
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--seq", type=int, default=S, help="1-D cases' length")
  args = parser.parse_args()
  d = args.head_dim
  rows = Rows()
  for name in args.cases.split(","):
    run, shape, small_shape = _case(name, d, args.seq)
    row = {"case": name, "q_shape": shape}
    small = inputs(small_shape, small_shape, jnp.bfloat16)
    want = fwd_bwd(run(None, "xla"))(*(x.astype(jnp.float32) for x in small))
    _set_stages(*DEFAULTS)
    got = fwd_bwd(run("own"))(*small)
    row["fused_rel_err_vs_xla_f32"] = rel_errors(got, want, digits=5)
    big = inputs(shape, shape, jnp.bfloat16)
    variants = {"kernel": lambda: (_set_stages(2, 2, 2, 2), run("kernel"))[1],
                "fused": lambda: (_set_stages(2, 2, 2, 2), run("own"))[1],
                "kernel_stages4": lambda: (_set_stages(4, 4, 4, 4), run("kernel"))[1],
                "fused_stages4": lambda: (_set_stages(4, 4, 4, 4), run("own"))[1],
                "default": lambda: (_set_stages(*DEFAULTS), run(None))[1]}
    interleaved_vs_first(row, variants, big)
    _set_stages(*DEFAULTS)
    if name in ("dense", "causal"):
      cudnn = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=name == "causal", implementation="cudnn")
      row["cudnn_fwd_bwd_ms"] = round(time_ms(fwd_bwd(cudnn), *big, iters=10, repeats=5), 4)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
