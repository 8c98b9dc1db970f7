"""Diagnostic: NA at the models' attention shapes (GPU): Triton kernel variants, or with
``--backends`` the backends side by side (triton, mosaic_gpu with and without window boxes,
cuDNN dense over all tokens), forward and forward+backward.

    PYTHONPATH=. python benchmarks/diag/diag_nat.py [--backends]   # prints JSON lines
"""
import argparse
import json

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import MosaicGPUConfig, TritonConfig

SHAPES = [((8, 128, 128, 4, 32), 13), ((8, 64, 64, 8, 32), 13),
          ((4, 8, 48, 48, 4, 64), (3, 9, 9))]


def fb(fn):
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(do)
  return jax.jit(run)


def triton_variants(kern):
  for name, kw in [("default", {}), ("element", dict(config=TritonConfig(mask_mma=False))),
                   ("block_q=128", dict(block_q=128)),
                   ("block_q=128 element", dict(block_q=128, config=TritonConfig(mask_mma=False)))]:
    yield name, lambda q, k, v, kw=kw: jsa.na(q, k, v, kern, backend="triton", **kw)


def backends(kern):
  yield "triton", lambda q, k, v: jsa.na(q, k, v, kern, backend="triton")
  yield "mosaic_gpu", lambda q, k, v: jsa.na(q, k, v, kern, backend="mosaic_gpu")
  yield "mosaic_gpu grid tiles", lambda q, k, v: jsa.na(
      q, k, v, kern, backend="mosaic_gpu", config=MosaicGPUConfig(kv_windows=False))

  def dense(q, k, v):
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
    return jax.nn.dot_product_attention(flat(q), flat(k), flat(v),
                                        implementation="cudnn").reshape(q.shape)
  yield "cudnn dense", dense


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--backends", action="store_true")
  args = parser.parse_args()
  for shape, kern in SHAPES:
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x in ks)
    for name, f in (backends(kern) if args.backends else triton_variants(kern)):
      try:
        r = dict(shape=shape, kernel=kern, variant=name,
                 fwd_ms=time_ms(jax.jit(f), q, k, v, iters=10),
                 fwd_bwd_ms=time_ms(fb(f), q, k, v, do, iters=10))
      except Exception as e:  # keep going
        r = dict(shape=shape, kernel=kern, variant=name, error=repr(e)[:300])
      print(json.dumps(r), flush=True)
    if args.backends:
      continue
    t = jsa.na_tiling(shape[1:-2], kern, block=128)
    tq, tk, tv, tdo = (t.tile(x) for x in (q, k, v, do))
    f = lambda q, k, v: jsa.na(q, k, v, kern, backend="triton", tiling=t)
    print(json.dumps(dict(shape=shape, variant="tiled order",
                          fwd_ms=time_ms(jax.jit(f), tq, tk, tv, iters=10),
                          fwd_bwd_ms=time_ms(fb(f), tq, tk, tv, tdo, iters=10))), flush=True)


if __name__ == "__main__":
  main()
