"""The role-split backward (`attention_bwd_wide`) once, for Nsight Compute: causal S=4096,
B=2, H=16, bf16, at head_dim 192 or 256 (the forward's 64-key plan). Profile one kernel per
process with ``-k``: ``regex:bwd_wide`` (dK/dV) or ``regex:bwd_dq_wide`` (dQ).

    ncu --clock-control none -k regex:bwd_dq_wide -c 1 --section SpeedOfLight \\
        --section WarpStateStats python -m benchmarks.diag.profile_wide 192
"""
import math
import os
import sys

import jax
import jax.numpy as jnp

from jax_sparse_attn import masks
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import backward_inputs


def main():
  d = int(sys.argv[1]) if len(sys.argv) > 1 else 192
  b, h, n = 2, 16, 4096
  cfg = MosaicGPUConfig(backward="mosaic_gpu")
  plan = make_plan(masks.causal(), SequenceLayout(n, 128), SequenceLayout(n, 64))
  q, k, v, do, out, lse = backward_inputs(plan, b, n, h, h, d, cfg, seed=1)
  f = jax.jit(lambda q, k, v, o, l, do: attention_bwd.backward(
      q, k, v, None, None, o, l, do, jnp.zeros_like(l), plan, 1 / math.sqrt(d), cfg, False))
  jax.block_until_ready(f(q, k, v, out, lse, do))
  print("head_dim", d, "blocks", int(plan.block_map.num_visited), flush=True)
  sys.stdout.flush()
  os._exit(0)  # ncu's session ends with the process


if __name__ == "__main__":
  main()
