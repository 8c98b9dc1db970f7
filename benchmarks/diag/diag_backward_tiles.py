"""The Hopper backward's tiles for 2-D neighborhoods, chosen by the 64x64 quarters its
kernels compute (`cost.backward_tile_shapes`, `QUARTER_TILES`) against the simulator's
blocks, and the 2-D windows `auto` trains on Triton's backward because they were never
measured on ours (`config.hopper_backward_neighborhood`: dilated and causal-dim windows at
128 columns, every 2-D window at 64). 2-D 128² k33: the simulator's (8, 16) against (16, 8),
whose 64-row halves are 8x8 squares with more dead quarters (the dK/dV and dQ kernels skip
them: `policy.QUARTERS`): the same 1920 visited blocks (520 full), 6400 live quarters
instead of 6912. Variants, fwd / fwd+bwd ms interleaved, gradients against the first's:

- ``simulator``: the simulator's tiles for the backward (`QUARTER_TILES=False`), the Hopper
  backward forced;
- ``quarter_tiles``: the backward's tiles by live quarters (its own gathered plan,
  `ops._backward_plan`; the forward keeps its tiles);
- ``square_halves``: (16, 8) tiles given to `na` (the forward takes them too, and the
  backward runs on the forward's plan);
- ``triton_bwd``: the Hopper forward with Triton's backward (`auto`'s choice today for
  every case here but k33_d128);
- ``rules_new`` / ``rules_old``: `na`'s defaults with the Hopper backward forced, with and
  without `cost.BIAS_BLOCKS_SLACK` and `cost.SHARED_TILES` (tilings that keep the MMA bias
  first; the forward on the backward's tiles);
- ``bwd_tiles_both``: the backward's tiles (`cost.backward_tile_shapes`) given to `na`, so
  the forward takes them too and the backward runs on the forward's plan (2026-12-06: (16, 8)
  for both passes had taken k17 dilation 4 from 3.09 to 2.36 ms, where the backward's own
  (4, 32) plan needs its own kernel-order copies of the non-box dilated tiles).

    python -m benchmarks.diag.diag_backward_tiles --cases k33_d128 --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import cost

from . import Rows, case_parser, interleaved_vs_first, knob_setter
from ..bench_gpu import inputs

# name: (spatial, kernel, dilation, causal, batch, heads, head_dim)
CASES = {"k33_d128": ((128, 128), 33, 1, False, 2, 16, 128),
         "k33_d64": ((96, 96), 33, 1, False, 4, 8, 64),
         "k7_d64": ((56, 56), 7, 1, False, 16, 8, 64),
         "k33_dil2": ((128, 128), 33, 2, False, 2, 16, 128),
         "k33_causal_h": ((128, 128), 33, 1, (True, False), 2, 16, 128),
         "k45_causal_hw": ((128, 128), 45, 1, (True, True), 2, 16, 128),
         "k17_dil4": ((128, 128), 17, 4, False, 2, 16, 128),
         "k13_d128": ((64, 64), 13, 1, False, 8, 16, 128)}
SQUARE = ((16, 8), (16, 8))


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--variants", default=None, help="a comma-separated subset")
  args = parser.parse_args()
  rows = Rows()
  quarter_tiles = knob_setter(cost, "QUARTER_TILES")
  slack, shared = knob_setter(cost, "BIAS_BLOCKS_SLACK"), knob_setter(cost, "SHARED_TILES")
  new_slack = cost.BIAS_BLOCKS_SLACK

  def rules(new: bool):
    slack(new_slack if new else 0)
    shared(new)
    return fn(True)

  hopper = MosaicGPUConfig(backward="mosaic_gpu")
  triton = MosaicGPUConfig(backward="triton")
  for name in args.cases.split(","):
    spatial, kern, dil, causal, b, h, d = CASES[name]

    def fn(knob, tiles=None, cfg=hopper):
      quarter_tiles(knob)
      q_tile, kv_tile = tiles or (None, None)
      return lambda q, k, v: jsa.na(q, k, v, kern, dilation=dil, is_causal=causal,
                                    backend="mosaic_gpu", config=cfg, q_tile_shape=q_tile,
                                    kv_tile_shape=kv_tile)

    big = inputs((b, *spatial, h, d), (b, *spatial, h, d), jnp.bfloat16)
    mask = jsa.masks.neighborhood(spatial, kern, 1, dil, causal)
    quarter_tiles(True)  # the pick, in the row
    bwd_tiles = tuple(cost.backward_tile_shapes(mask, 128, 128))
    row = {"case": name, "batch": b, "heads": h, "head_dim": d,
           "tiles": [list(t) for t in bwd_tiles],
           "forward_tiles": [list(t) for t in cost.auto_tiles(mask, 128, 128)]}
    variants = {"simulator": lambda: fn(False), "quarter_tiles": lambda: fn(True),
                "square_halves": lambda: fn(True, SQUARE),
                "triton_bwd": lambda: fn(True, cfg=triton),
                "bwd_tiles_both": lambda: fn(True, bwd_tiles),
                "rules_new": lambda: rules(True), "rules_old": lambda: rules(False)}
    if args.variants:
      variants = {n: variants[n] for n in args.variants.split(",")}
    interleaved_vs_first(row, variants, big, rounds=args.rounds)
    rules(True)
    quarter_tiles(False)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
