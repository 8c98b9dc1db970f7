"""The Hopper dK/dV kernel once per case, for Nsight Compute: 2-D NA 128² k33 in kernel order
(MHA, then GQA 16/4) and dense S=4096 (the same block work per CTA as dense S=16384, shorter
launch), the dQ kernel patched out so that the profiled launches are dK/dV's only;
window: the causal window 2048 at S=32768, B=1 (17 Q blocks per KV block: the short lists
whose per-block cost is 1.5x dense's); dense4096_fused: the fused form (`backward_dq="split"`: dQ reduce-added in float32 by the
dK/dV kernel, one launch, 5 matmuls per block pair instead of 7); lm, lm_mha, lm_no_sinks:
the LM layer's mask (causal & (window 512 | 4 sinks), S=8192, B=2) with GQA 16/4 and 16/16,
and without the sinks.

    ncu --clock-control none -k regex:sparse_attention_bwd --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        python -m benchmarks.diag.profile_dkv [na2d|na2d_gqa4|dense4096|window|dense4096_fused|lm|...
        [longest|classes|natural]]
"""
import math
import os
import sys

import jax
import jax.numpy as jnp

from jax_sparse_attn import masks
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq, work_items

from . import backward_inputs


def main():
  b, h, d = 2, 16, 128
  scale = 1 / math.sqrt(d)
  cfg = MosaicGPUConfig(backward="mosaic_gpu")
  lay = TiledLayout((128, 128), (1, 1), (8, 16))
  na = make_plan(masks.neighborhood((128, 128), (33, 33)), lay, lay)
  dense = make_plan(masks.full(), SequenceLayout(4096, 128), SequenceLayout(4096, 128))
  window = make_plan(masks.causal() & masks.sliding_window(2047), SequenceLayout(32768, 128),
                     SequenceLayout(32768, 128))
  seq = lambda mask, n: make_plan(mask, SequenceLayout(n, 128), SequenceLayout(n, 128))
  lm = seq(masks.causal() & (masks.sliding_window(511) | masks.sink(4)), 8192)
  lm_no_sinks = seq(masks.causal() & masks.sliding_window(511), 8192)
  attention_bwd_dq.dq = lambda q, *a, **kw: jnp.zeros_like(q)
  cases = (("na2d", na, 16384, 16, b), ("na2d_gqa4", na, 16384, 4, b),
           ("dense4096", dense, 4096, 16, b), ("window", window, 32768, 16, 1),
           ("dense4096_fused", dense, 4096, 16, b),
           # the LM layer's mask (GQA 16/4, and MHA: 4x the CTAs, each a quarter as long)
           ("lm", lm, 8192, 4, b), ("lm_mha", lm, 8192, 16, b),
           ("lm_no_sinks", lm_no_sinks, 8192, 4, b))
  only = sys.argv[1] if len(sys.argv) > 1 else None
  if len(sys.argv) > 2:  # a work-item order (`work_items.ITEM_ORDER`), lists cut only at outliers
    work_items.ITEM_ORDER, work_items.SPLIT_OUTLIERS = sys.argv[2], True
  for label, plan, n, hkv, batch in cases:
    if only and label != only:
      continue
    c = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split" if "fused" in label else
                        "kernel")  # dK/dV alone (dense S=4096 would fuse by default)
    q, k, v, do, out, lse = backward_inputs(plan, batch, n, h, hkv, d, cfg, seed=1)
    f = jax.jit(lambda q, k, v, o, l, do: attention_bwd.backward(
        q, k, v, None, None, o, l, do, jnp.zeros_like(l), plan, scale, c, False))
    jax.block_until_ready(f(q, k, v, out, lse, do))
    print(label, "blocks", int(plan.block_map.num_visited), flush=True)
  if only:  # one case per process: leave at once (ncu's session ends with the process)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
  main()
