"""Diagnostic: neighborhoods on grids smaller than a 128-token tile (NAT's last stage at
224 px: 7×7, kernel 7; 8×8; a small 3-D latent), the tiles chosen since 2026-12-07 (the
ones that pad the grid least: one block) against the row tiles chosen before ((1, 128):
a block per row, 7×7 block pairs of 49 real keys, on the Hopper kernels; Triton's took
(8, 8) query tiles and those KV tiles). Gradients of each against float32 XLA.

    PYTHONPATH=. python -m benchmarks.diag.diag_small_grids [--out F.json]
"""
import argparse

import jax.numpy as jnp

import jax_sparse_attn as jsa
from benchmarks import bench_gpu
from benchmarks.bench_gpu import record

# (spatial, kernel, batch, heads, head_dim): NAT-Mini/Tiny's stage 4 at 224 px (7×7, heads
# 16 at 512 channels), an 8×8 grid at kernel 3, a 3-D latent of 2×5×5.
CASES = [((7, 7), 7, 128, 16, 32), ((8, 8), 3, 64, 8, 64), ((2, 5, 5), (2, 3, 3), 64, 8, 64)]


def _row_tiles(ndim):
  return tuple(128 if i == ndim - 1 else 1 for i in range(ndim))


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--interpret", action="store_true", help="CPU smoke run: interpret "
                      "mode, one batch row and head, one timing iteration")
  args = parser.parse_args(argv)
  for spatial, kern, b, h, d in CASES:
    if args.interpret:
      b, h, args.iters = 1, 1, 1
    shape = (b,) + spatial + (h, d)
    q, k, v, do = bench_gpu.inputs(shape, shape, jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = bench_gpu.fwd_bwd(lambda q, k, v: jsa.na(q, k, v, kern, backend="xla"))(*f32)
    case = f"{'x'.join(map(str, spatial))} k{kern} B={b} H={h} D={d}"
    for backend in ("mosaic_gpu", "triton"):
      for name, kw in (("least padding (now)", {}),
                       ("row tiles (1, 128)", dict(q_tile_shape=_row_tiles(len(spatial)),
                                                   kv_tile_shape=_row_tiles(len(spatial))))):
        fn = lambda q, k, v, kw=kw, backend=backend: jsa.na(
            q, k, v, kern, backend=backend, interpret=args.interpret, **kw)
        try:
          got = bench_gpu.fwd_bwd(fn)(q, k, v, do)
          errs = bench_gpu.rel_errors(got, want, digits=5)
          ok = bench_gpu.all_finite(got)
        except Exception as e:  # keep going
          record(section="small_grids", case=case, impl=f"{backend} {name}", error=repr(e)[:400])
          continue
        bench_gpu.perf_row("small_grids", case, f"{backend} {name}", fn, (q, k, v), do,
                           args.iters, finite=ok, **errs)
  bench_gpu.write_results(args.out, bench_gpu.header())


if __name__ == "__main__":
  main()
