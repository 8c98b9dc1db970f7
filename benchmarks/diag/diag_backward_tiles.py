"""The Hopper backward's tiles for 2-D neighborhoods: the simulator's (8, 16) against (16, 8),
whose 64-row halves are 8x8 squares with more 64x64 quarters that no pair can see (the dK/dV
and dQ kernels skip them: `attention_bwd.QUARTERS`). 2-D 128² k33 at the same 1920 visited
blocks (520 full) has 6400 live quarters instead of 6912; 64² k13 484 instead of 616 over
220 blocks instead of 196. Given tiles are the forward's too (`na(..., q_tile_shape=,
kv_tile_shape=)` keeps the backward on the forward's plan), so the forward is timed beside:
fwd / fwd+bwd ms, variants interleaved, gradients against the first variant's.

    python -m benchmarks.diag.diag_backward_tiles --cases k33_d128 --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig

from . import Rows, case_parser, interleaved, max_rel_diff
from ..bench_gpu import inputs

# name: (spatial, kernel, batch, heads, head_dim)
CASES = {"k33_d128": ((128, 128), 33, 2, 16, 128), "k13_d128": ((64, 64), 13, 8, 16, 128),
         "k7_d64": ((56, 56), 7, 16, 8, 64)}
TILES = {"simulator": None, "square_halves": ((16, 8), (16, 8))}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rows = Rows()
  hopper = MosaicGPUConfig(backward="mosaic_gpu")
  for name in args.cases.split(","):
    spatial, kern, b, h, d = CASES[name]

    def fn(tiles):
      q_tile, kv_tile = tiles or (None, None)
      return lambda q, k, v: jsa.na(q, k, v, kern, backend="mosaic_gpu", config=hopper,
                                    q_tile_shape=q_tile, kv_tile_shape=kv_tile)

    big = inputs((b, *spatial, h, d), (b, *spatial, h, d), jnp.bfloat16)
    row = {"case": name}
    variants = {v: (lambda t=t: fn(t)) for v, t in TILES.items()}
    grads = interleaved(row, variants, big, rounds=args.rounds)
    row["rel_diff"] = max_rel_diff(grads["square_halves"], grads["simulator"])
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
