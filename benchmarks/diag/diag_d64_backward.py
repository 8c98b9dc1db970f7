"""The Hopper backward at head_dim 64 (ViT-B's 12 heads, B=2): where the benchmark CLI found
dense and causal training at S=16384 8-9% behind cuDNN (H100, 2026-12-06,
benchmarks/results/h100-2026-12-06-hd64.json). Variants, interleaved over two rounds, fwd /
fwd+bwd ms, gradients against the first's:

- ``kernel``: dQ its own kernel over 2 Q/dO slots (the default at 64 columns before this
  diagnostic; since, it stays so on short lists and neighborhoods);
- ``fused``: dQ reduce-added by the dK/dV kernel, each warpgroup its own keys' share
  (``backward_dq="own"``: 5 matmuls per block pair instead of 7; at 64 columns the dK/dV
  accumulators leave room for it without spills);
- ``kernel_stages4``: the default with 4 Q/dO slots (a slot is half the bytes of 128 columns');
- ``fused_stages4``: both (the default on 1-D masks with long lists since 2026-12-06:
  `attention_bwd.FUSED_MIN_ENTRIES_64`, `FUSED_STAGES_64`; the variants set the forms
  explicitly, so they stay what they say).

cuDNN beside each case, and a gradient check of ``fused`` against float32 XLA at S=2048.

    python -m benchmarks.diag.diag_d64_backward --out x.json [--cases dense,causal,window,lm]
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import Rows, case_parser, interleaved_vs_first
from ..bench_gpu import fwd_bwd, inputs, rel

CASES = {"dense": masks.full(), "causal": masks.causal(),
         "window": masks.causal() & masks.sliding_window(2047),
         "lm": masks.causal() & (masks.sliding_window(511) | masks.sink(4))}
B, S, H, D = 2, 16384, 12, 64


def _set_stages(n: int):
  attention_bwd.STAGES = attention_bwd.FUSED_STAGES = n
  ops._make_core.cache_clear()
  jax.clear_caches()


def main():
  parser = case_parser("dense,causal")
  args = parser.parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    mask = CASES[name]
    run = lambda dq: (lambda q, k, v: jsa.attention(
        q, k, v, mask, backend="mosaic_gpu",
        config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq)))
    row = {"case": f"{name} S={S}", "batch": B, "heads": H, "head_dim": D}
    small = inputs((1, 2048, 4, D), (1, 2048, 4, D), jnp.bfloat16)
    want = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"))(
        *(x.astype(jnp.float32) for x in small))
    got = fwd_bwd(run("own"))(*small)
    row["fused_rel_err_vs_xla_f32"] = {n: round(rel(g, w), 5) for n, g, w in
                                       zip(("out", "dq", "dk", "dv"), got, want)}
    big = inputs((B, S, H, D), (B, S, H, D), jnp.bfloat16)
    variants = {"kernel": lambda: (_set_stages(2), run("kernel"))[1],
                "fused": lambda: (_set_stages(2), run("own"))[1],
                "kernel_stages4": lambda: (_set_stages(4), run("kernel"))[1],
                "fused_stages4": lambda: (_set_stages(4), run("own"))[1]}
    interleaved_vs_first(row, variants, big)
    _set_stages(2)
    if name in ("dense", "causal"):
      cudnn = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=name == "causal", implementation="cudnn")
      row["cudnn_fwd_bwd_ms"] = round(time_ms(fwd_bwd(cudnn), *big, iters=10, repeats=5), 4)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
