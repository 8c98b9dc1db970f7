"""Diagnostic: where 2-D NA forward time goes (H100). Times the forward with the MMA bias
replaced by zeros (no table load, no matmul: WRONG results, timing only), and with one loop
instead of full + partial loops, beside the real kernel. Prints JSON lines.

    PYTHONPATH=. python -m benchmarks.diag.diag_na_overhead --out results.json
"""
import argparse
import math

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from benchmarks.bench_gpu import header, inputs, record, write_results
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import TritonConfig, triton_attention as ta


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  spatial, kern, b = (128, 128), (33, 33), 2
  q, k, v, _ = inputs((b,) + spatial + (16, 128), (b,) + spatial + (16, 128), jnp.bfloat16)
  real_call = ta._MMABias.__call__
  zero = lambda self, start, step: jnp.zeros((self.rows, self.loop_size), jnp.float32)
  for qt, kt in (((8, 16), (8, 8)), ((8, 8), (8, 8))):
    for name, cfg, patch in (("real", TritonConfig(), False),
                             ("zero bias", TritonConfig(), True),
                             ("zero bias, one loop", TritonConfig(single_loop=True), True),
                             ("computed tests", TritonConfig(mask_tables=False), False)):
      ta._MMABias.__call__ = zero if patch else real_call
      f = jax.jit(lambda q, k, v, qt=qt, kt=kt, cfg=cfg: jsa.na(
          q, k, v, kern, backend="triton", q_tile_shape=qt, kv_tile_shape=kt,
          block_q=math.prod(qt), block_kv=math.prod(kt), config=cfg))
      record(case="na2d 128x128 k33 B=2 fwd", tiles=f"{qt}/{kt}", variant=name,
             fwd_ms=time_ms(f, q, k, v, iters=20, repeats=5))
      ta._MMABias.__call__ = real_call
  t = jsa.na_tiling(spatial, kern, block=128)
  tq, tk, tv = (t.tile(x) for x in (q, k, v))
  f = jax.jit(lambda q, k, v: jsa.na(q, k, v, kern, backend="triton", tiling=t))
  record(case="na2d 128x128 k33 B=2 fwd", tiles=str(t.layout.tile_shape), variant="tiled order",
         fwd_ms=time_ms(f, tq, tk, tv, iters=20, repeats=5))
  write_results(args.out, header())


if __name__ == "__main__":
  main()
