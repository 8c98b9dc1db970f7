"""Diagnostic: NA at the models' attention shapes, several Triton kernel variants (GPU).

    PYTHONPATH=. python benchmarks/diag_nat.py   # prints JSON lines
"""
import json, jax, jax.numpy as jnp
import jax_sparse_attn as jsa
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import TritonConfig

def fb(fn):
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(do)
  return jax.jit(run)

for shape, kern in [((8, 128, 128, 4, 32), 13), ((8, 64, 64, 8, 32), 13), ((4, 8, 48, 48, 4, 64), (3, 9, 9))]:
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x in ks)
  for name, kw in [("default", {}), ("element", dict(config=TritonConfig(mask_mma=False))),
                   ("block_q=128", dict(block_q=128)),
                   ("block_q=128 element", dict(block_q=128, config=TritonConfig(mask_mma=False)))]:
    f = lambda q, k, v, kw=kw: jsa.na(q, k, v, kern, backend="triton", **kw)
    r = dict(shape=shape, variant=name, fwd_ms=time_ms(jax.jit(f), q, k, v, iters=10),
             fwd_bwd_ms=time_ms(fb(f), q, k, v, do, iters=10))
    print(json.dumps(r), flush=True)
  t = jsa.na_tiling(shape[1:-2], kern, block=128)
  tq, tk, tv, tdo = (t.tile(x) for x in (q, k, v, do))
  f = lambda q, k, v: jsa.na(q, k, v, kern, backend="triton", tiling=t)
  print(json.dumps(dict(shape=shape, variant="tiled order", fwd_ms=time_ms(jax.jit(f), tq, tk, tv, iters=10),
                        fwd_bwd_ms=time_ms(fb(f), tq, tk, tv, tdo, iters=10))), flush=True)
