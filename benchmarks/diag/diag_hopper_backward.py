"""One launch of the Hopper backward kernel for a profiler (ncu), dense or causal.

    ncu --clock-control none -k regex:bwd -c 1 --section WarpStateStats \
        python3 -m benchmarks.diag.diag_hopper_backward --mask causal
"""
import argparse

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.gpu import MosaicGPUConfig


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mask", default="dense")
  parser.add_argument("--seq", type=int, default=8192)
  parser.add_argument("--dq", default=None)
  args = parser.parse_args()
  mask = {"dense": None, "causal": masks.causal()}[args.mask]
  b, h, d, s = 2, 16, 128, args.seq
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(x, (b, s, h, d), jnp.bfloat16) for x in ks)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq=args.dq)
  fn = lambda q, k, v: jsa.attention(q, k, v, mask, backend="mosaic_gpu", config=cfg)

  @jax.jit
  def step(q, k, v, do):
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(do)

  jax.block_until_ready(step(q, k, v, do))


if __name__ == "__main__":
  main()
