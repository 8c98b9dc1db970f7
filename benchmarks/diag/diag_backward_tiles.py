"""The Hopper backward's tiles for 2-D neighborhoods, chosen by the 64x64 quarters its
kernels compute (`cost.backward_tile_shapes`, `QUARTER_TILES`) against the simulator's
blocks. 2-D 128² k33: the simulator's (8, 16) against (16, 8), whose 64-row halves are 8x8
squares with more dead quarters (the dK/dV and dQ kernels skip them:
`attention_bwd.QUARTERS`): the same 1920 visited blocks (520 full), 6400 live quarters
instead of 6912; 56² k7: (2, 64) tiles, 136 blocks and 392 quarters instead of 156 and 480.
Variants, fwd / fwd+bwd ms interleaved, gradients against the first variant's:

- ``simulator``: the simulator's tiles for the backward (`QUARTER_TILES=False`), the Hopper
  backward forced;
- ``quarter_tiles``: the default, the backward's tiles by live quarters (its gathered plan,
  `ops._backward_plan`; the forward keeps its own);
- ``square_halves``: (16, 8) tiles given to `na` (the forward takes them too and the
  backward runs on the forward's plan);
- ``triton_bwd``: the Hopper forward with Triton's backward (what `auto` trains short and
  64-column 2-D windows on).

    python -m benchmarks.diag.diag_backward_tiles --cases k33_d128 --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import cost

from . import Rows, case_parser, interleaved, knob_setter, max_rel_diff
from ..bench_gpu import inputs

# name: (spatial, kernel, batch, heads, head_dim)
CASES = {"k33_d128": ((128, 128), 33, 2, 16, 128), "k33_d64": ((96, 96), 33, 4, 8, 64),
         "k7_d64": ((56, 56), 7, 16, 8, 64)}
SQUARE = ((16, 8), (16, 8))


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rows = Rows()
  quarter_tiles = knob_setter(cost, "QUARTER_TILES")
  hopper = MosaicGPUConfig(backward="mosaic_gpu")
  triton = MosaicGPUConfig(backward="triton")
  for name in args.cases.split(","):
    spatial, kern, b, h, d = CASES[name]

    def fn(knob, tiles=None, cfg=hopper):
      quarter_tiles(knob)
      q_tile, kv_tile = tiles or (None, None)
      return lambda q, k, v: jsa.na(q, k, v, kern, backend="mosaic_gpu", config=cfg,
                                    q_tile_shape=q_tile, kv_tile_shape=kv_tile)

    big = inputs((b, *spatial, h, d), (b, *spatial, h, d), jnp.bfloat16)
    row = {"case": name, "batch": b, "heads": h, "head_dim": d,
           "tiles": [list(t) for t in cost.backward_tile_shapes(
               jsa.masks.neighborhood(spatial, kern), 128, 128)]}
    variants = {"simulator": lambda: fn(False), "quarter_tiles": lambda: fn(True),
                "square_halves": lambda: fn(True, SQUARE),
                "triton_bwd": lambda: fn(True, cfg=triton)}
    grads = interleaved(row, variants, big, rounds=args.rounds)
    quarter_tiles(True)
    for v in list(variants)[1:]:
      row[f"{v}_rel_diff"] = max_rel_diff(grads[v], grads["simulator"])
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
