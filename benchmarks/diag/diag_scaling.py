"""Cost as the work grows (PERF.md's scaling item: time per visited block at 524k tokens within
10% of the 65k rate for 3-D NA k8×16²): forward and fwd+bwd ms of `backend="auto"` on a small
and a large problem of each mask, B=1, H=16, D=128, bf16, with the visited 128×128 blocks of
the simulator's best tiles (`simulate.best_tile_shapes`, `visited_blocks`; 1-D masks: the
block map) and the rate per visited block of the large problem relative to the small one
(1.0: the same rate; below: slower per block). ``--variants`` adds strided rows with the
fused backward forced (`policy.FUSED_MIN_ENTRIES` = 0).

    python -m benchmarks.diag.diag_scaling --out scaling.json
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.block_map import build
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.simulate import best_tile_shapes, visited_blocks
from pallas_kernels.gpu.mosaic_gpu import policy

from . import Rows, case_parser
from ..bench_gpu import all_finite, fwd_bwd, inputs

H, D = 16, 128


def _na(spatial, kernel, stride=1):
  m = masks.neighborhood(spatial, kernel, stride)
  tq, tk = best_tile_shapes(m, 128, 128)
  visited = visited_blocks(m, tq, tk)[0]
  run = lambda q, k, v: jsa.na(q, k, v, kernel, stride)
  return run, (1, *spatial, H, D), visited


def _window(s, w):
  m = masks.causal() & masks.sliding_window(w - 1)
  bmap = build(m, SequenceLayout(s, 128), SequenceLayout(s, 128))
  visited = int(np.asarray(bmap.kv_counts).sum())
  run = lambda q, k, v: jsa.attention(q, k, v, m)
  return run, (1, s, H, D), visited


CASES = {
    "3-D NA k8x16^2": [("16x64x64", lambda: _na((16, 64, 64), (8, 16, 16))),
                       ("32x128x128", lambda: _na((32, 128, 128), (8, 16, 16)))],
    "3-D NA k8x16^2 stride 4x8x8": [
        ("16x64x64", lambda: _na((16, 64, 64), (8, 16, 16), (4, 8, 8))),
        ("32x128x128", lambda: _na((32, 128, 128), (8, 16, 16), (4, 8, 8)))],
    "2-D NA k33": [("128x128", lambda: _na((128, 128), (33, 33))),
                   ("512x512", lambda: _na((512, 512), (33, 33)))],
    "causal window 2048": [("S=32768", lambda: _window(32768, 2048)),
                           ("S=524288", lambda: _window(524288, 2048))],
}


def _time(run, shape, iters):
  q, k, v, do = inputs(shape, shape, jnp.bfloat16)
  fwd = jax.jit(run)
  both = fwd_bwd(run)
  t = time.perf_counter()
  jax.block_until_ready(both(q, k, v, do))
  compile_s = time.perf_counter() - t
  out = dict(fwd_ms=round(time_ms(fwd, q, k, v, iters=iters, repeats=5, warmup=2), 3),
             fwd_bwd_ms=round(time_ms(both, q, k, v, do, iters=iters, repeats=5, warmup=1), 3),
             first_call_s=round(compile_s, 1))
  out["finite"] = all_finite(both(q, k, v, do))
  return out


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--variants", action="store_true")
  args = parser.parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    small = None
    for size, make in CASES[name]:
      run, shape, visited = make()
      row = dict(case=name, size=size, tokens=int(np.prod(shape[1:-2])), visited=visited)
      try:
        row.update(_time(run, shape, iters=3 if small else 10))
      except Exception as e:  # noqa: BLE001 - a failing size is a result
        row["error"] = repr(e)[:300]
      if small is None:
        small = row
      elif "error" not in row and "error" not in small:
        for key in ("fwd_ms", "fwd_bwd_ms"):  # small's ms per block over large's
          row[f"{key[:-3]}_rate_vs_small"] = round(
              (small[key] / small["visited"]) / (row[key] / row["visited"]), 3)
      if args.variants and "stride" in name:
        saved = policy.FUSED_MIN_ENTRIES
        try:
          policy.FUSED_MIN_ENTRIES = 0
          jsa.ops._make_core.cache_clear()
          row["fused"] = _time(run, shape, iters=3 if small is not row else 10)
        except Exception as e:  # noqa: BLE001
          row["fused"] = repr(e)[:300]
        finally:
          policy.FUSED_MIN_ENTRIES = saved
          jsa.ops._make_core.cache_clear()
      rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
