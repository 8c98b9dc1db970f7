"""Diagnostic: NA forward (and forward+backward) over tile shapes x Triton kernel variants
at the issue's target shapes (H100, bf16). Prints JSON lines; `--out` also writes them.

    PYTHONPATH=. python -m benchmarks.diag.diag_na_variants --out results.json
"""
import argparse
import math

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from benchmarks.bench_gpu import fwd_bwd, header, inputs, record, write_results
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import TritonConfig

CONFIGS = {"default": TritonConfig(), "stages=3": TritonConfig(num_stages=3),
           "single_loop": TritonConfig(single_loop=True), "warps=8": TritonConfig(num_warps=8),
           "single_loop onehot rows": TritonConfig(single_loop=True, mma_onehot="rows"),
           "single_loop stages=3": TritonConfig(single_loop=True, num_stages=3),
           "onehot rows": TritonConfig(mma_onehot="rows"),
           "onehot loop": TritonConfig(mma_onehot="loop"),
           "computed tests": TritonConfig(mask_tables=False)}

CASES = [
    ((128, 128), (33, 33), 2, [(((8, 16), (8, 8)), ("default", "single_loop",
                                                     "single_loop onehot rows",
                                                     "single_loop stages=3"), True),
                               (((16, 8), (8, 8)), ("default", "single_loop"), False),
                               (((8, 8), (8, 8)), ("default", "single_loop"), False)]),
    ((16, 64, 64), (8, 16, 16), 1, [(((4, 4, 8), (4, 4, 4)), ("default", "single_loop"), True)]),
]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None)
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()
  for spatial, kern, b, variants in CASES:
    q, k, v, do = inputs((b,) + spatial + (16, 128), (b,) + spatial + (16, 128), jnp.bfloat16)
    for (qt, kt), names, with_bwd in variants:
      sim = jsa.simulate(spatial, kern, block_q=math.prod(qt), block_kv=math.prod(kt),
                         q_tile_shape=qt, kv_tile_shape=kt)
      for name in names:
        f = lambda q, k, v, qt=qt, kt=kt, cfg=CONFIGS[name]: jsa.na(
            q, k, v, kern, backend="triton", q_tile_shape=qt, kv_tile_shape=kt,
            block_q=math.prod(qt), block_kv=math.prod(kt), config=cfg)
        r = dict(case=f"na{len(spatial)}d {spatial} k{kern} B={b}", tiles=f"{qt}/{kt}",
                 variant=name, bound=sim.block_speedup_bound, full=sim.full_blocks,
                 partial=sim.partial_blocks)
        try:
          r["fwd_ms"] = time_ms(jax.jit(f), q, k, v, iters=args.iters)
          if with_bwd and name in ("default", "single_loop"):
            r["fwd_bwd_ms"] = time_ms(fwd_bwd(f), q, k, v, do, iters=args.iters)
        except Exception as e:  # record and go on
          r["error"] = repr(e)[:300]
        record(**r)
  write_results(args.out, header())


if __name__ == "__main__":
  main()
