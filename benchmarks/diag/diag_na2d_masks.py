"""2-D neighborhoods that `auto` trains on Triton's backward because they were never measured
on the Hopper one (`config.hopper_backward_neighborhood`: plain windows only, at 128
columns): dilated and causal-dim windows of ~1000 keys at 128², and a window at 64 columns.
The Hopper forward in each; the backward forced to Triton's, to the Hopper one (its tiles
by live quarters, `cost.QUARTER_TILES`: (16, 8) for the dilated k33 and causal-h k33, (4,
32) for k17 dilation 4) and to the Hopper one on the simulator's tiles; fwd / fwd+bwd ms
interleaved, the gradients against Triton's.

    python -m benchmarks.diag.diag_na2d_masks --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import cost

from . import Rows, case_parser, interleaved, knob_setter, max_rel_diff
from ..bench_gpu import inputs

# name: (spatial, kernel, dilation, causal, batch, heads, head_dim)
CASES = {"k33_dil2": ((128, 128), 33, 2, False, 2, 16, 128),
         "k33_causal_h": ((128, 128), 33, 1, (True, False), 2, 16, 128),
         "k45_causal_hw": ((128, 128), 45, 1, (True, True), 2, 16, 128),
         "k17_dil4": ((128, 128), 17, 4, False, 2, 16, 128)}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rows = Rows()
  quarter_tiles = knob_setter(cost, "QUARTER_TILES")
  for name in args.cases.split(","):
    spatial, kern, dil, causal, b, h, d = CASES[name]

    def fn(bwd, knob=True):
      quarter_tiles(knob)
      return lambda q, k, v: jsa.na(q, k, v, kern, dilation=dil, is_causal=causal,
                                    backend="mosaic_gpu", config=MosaicGPUConfig(backward=bwd))

    big = inputs((b, *spatial, h, d), (b, *spatial, h, d), jnp.bfloat16)
    row = {"case": name, "batch": b, "heads": h, "head_dim": d}
    variants = {"triton": lambda: fn("triton"), "hopper": lambda: fn("mosaic_gpu"),
                "hopper_simulator_tiles": lambda: fn("mosaic_gpu", False)}
    grads = interleaved(row, variants, big, rounds=args.rounds)
    quarter_tiles(True)
    for v in list(variants)[1:]:
      row[f"{v}_rel_diff"] = max_rel_diff(grads[v], grads["triton"])
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
