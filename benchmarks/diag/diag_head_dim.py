"""Head dims 32/64/96/128/256 on the H200: causal attention, S=8192, B=2, H=16, bf16, our
`mosaic_gpu` and `triton` backends beside cuDNN, forward and fwd+bwd, with a real-size check
of each of ours against the float32 XLA backend (S=2048) in the same call. ``--padded``: also
`mosaic_gpu` at the head dim's width before it had its own (`native_widths`: 32 at 64, 96 at
128, 160 at 192, 192 at 256); ``--dense``: no mask (cuDNN without ``is_causal``).

    python -m benchmarks.diag.diag_head_dim --out x.json
    python -m benchmarks.diag.diag_head_dim --head-dims 80,96 --padded --no-triton
"""
import argparse

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, ops
from jax_sparse_attn.demo import time_ms

from . import Rows, native_widths
from ..bench_gpu import fwd_bwd, rel_errors
from pallas_kernels.gpu import MosaicGPUConfig


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--head-dims", default="32,64,96,128,256")
  parser.add_argument("--padded", action="store_true")
  parser.add_argument("--no-triton", action="store_true")
  parser.add_argument("--dense", action="store_true")
  parser.add_argument("--stages", type=int, default=None,
                      help="also `mosaic_gpu` with this many forward K/V slots")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = Rows()
  record = rows.record

  mask = masks.full() if args.dense else masks.causal()
  for d in map(int, args.head_dims.split(",")):
    ks = jax.random.split(jax.random.PRNGKey(d), 4)
    make = lambda s: tuple(jax.random.normal(x, (2, s, 16, d), jnp.bfloat16) for x in ks)
    small, big = make(2048), make(8192)
    ref = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"))(
        *(x.astype(jnp.float32) for x in small))
    backends = ("mosaic_gpu",) + (() if args.no_triton else ("triton",))
    impls = {f"ours: {be}": (lambda q, k, v, be=be: jsa.attention(q, k, v, mask, backend=be))
             for be in backends}
    if args.padded:
      impls["ours: mosaic_gpu padded"] = lambda q, k, v: jsa.attention(  # its own jit cache
          q, k, v, mask, backend="mosaic_gpu")
    if args.stages:
      impls[f"ours: mosaic_gpu stages {args.stages}"] = lambda q, k, v: jsa.attention(
          q, k, v, mask, backend="mosaic_gpu", config=MosaicGPUConfig(stages=args.stages))
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=not args.dense, implementation="cudnn")
    for name, fn in impls.items():
      row = dict(head_dim=d, impl=name, mask="full" if args.dense else "causal")
      native = not name.endswith("padded")
      native_widths(native, d)
      ops._make_core.cache_clear()
      try:
        got = fwd_bwd(fn)(*small)
        row["rel_err"] = rel_errors(got, ref, digits=5)
        row["fwd_ms"] = time_ms(jax.jit(fn), *big[:3], iters=10, repeats=5)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd(fn), *big, iters=10, repeats=5)
      except Exception as e:  # noqa: BLE001 (a path that fails is a result)
        row["error"] = repr(e)[:300]
      finally:
        native_widths(True)
      record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
