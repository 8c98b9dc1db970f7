"""One dense forward launch per process for Nsight Compute: ours (`backend="mosaic_gpu"`) or
tokamax's Hopper kernel (`tokamax.dot_product_attention(implementation="mosaic")`), dense
S=4096, B=2, H=16, D=128 bf16 (the per-CTA work of S=16384, a shorter launch). Inputs come
from host NumPy, so the launches profiled are the attention op's.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section ComputeWorkloadAnalysis --section LaunchStats --section SchedulerStats \\
        python -m benchmarks.diag.profile_fwd ours|tokamax
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa


def main():
  which = sys.argv[1]
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 4096, 16, 128)).astype(jnp.bfloat16))
             for _ in range(3))
  if which == "ours":
    f = jax.jit(lambda q, k, v: jsa.attention(q, k, v, backend="mosaic_gpu"))
  else:
    import tokamax
    f = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v,
                                                              implementation="mosaic"))
  jax.block_until_ready(f(q, k, v))
  print(which, "done", flush=True)
  os._exit(0)  # one launch per process: ncu's session ends with the process


if __name__ == "__main__":
  main()
