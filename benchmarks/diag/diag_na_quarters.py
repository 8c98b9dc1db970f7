"""Dead 64x64 quarters in the neighborhood backward. 2-D neighborhoods at head_dim 64 and
128, which `auto` trains on Triton's backward (its 64-row query tiles): that against the
Hopper backward as it runs when forced, with the dead quarters skipped at every share
(`policy.QUARTERS_MIN_DEAD` = 0; by default only from 10%: 2-D k33 has 10.0% minus
rounding, k13 and k7 23%) and never (`QUARTERS=False`). 3-D NA k8x16² (10% dead; `auto`:
the fused backward, which skips none): that against dQ as its own kernel with and without
the skips. (The fused kernel skipping them too, commit acdf882's `QUARTERS_FUSED`, ran 5%
slower than without: docs/experiments/h100-2026-12-05-quarters-na.json.) fwd / fwd+bwd ms interleaved over two rounds, every variant's gradients against
the first's at full size.

    python -m benchmarks.diag.diag_na_quarters --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import policy

from . import Rows, case_parser, interleaved, knob_setter, max_rel_diff
from ..bench_gpu import inputs

# name: (spatial, kernel, batch, heads, head_dim)
CASES = {"k33_d128": ((128, 128), 33, 2, 16, 128), "k13_d128": ((64, 64), 13, 8, 16, 128),
         "k7_d64": ((56, 56), 7, 16, 8, 64), "k33_d64": ((96, 96), 33, 4, 8, 64),
         "na3d": ((16, 64, 64), (8, 16, 16), 1, 16, 128)}


def main():
  args = case_parser(",".join(CASES)).parse_args()
  rows = Rows()
  min_dead = knob_setter(policy, "QUARTERS_MIN_DEAD")
  quarters = knob_setter(policy, "QUARTERS")
  default_min = policy.QUARTERS_MIN_DEAD
  hopper = MosaicGPUConfig(backward="mosaic_gpu")
  for name in args.cases.split(","):
    spatial, kern, b, h, d = CASES[name]
    fn = lambda cfg: (lambda q, k, v: jsa.na(q, k, v, kern, backend="mosaic_gpu", config=cfg))
    big = inputs((b, *spatial, h, d), (b, *spatial, h, d), jnp.bfloat16)
    variants = {
        "auto": lambda: (quarters("auto"), min_dead(default_min), fn(None))[-1],
        "hopper": lambda: (quarters("auto"), min_dead(default_min), fn(hopper))[-1],
        "hopper_quarters": lambda: (quarters("auto"), min_dead(0.0), fn(hopper))[-1],
        "hopper_no_quarters": lambda: (quarters(False), min_dead(default_min), fn(hopper))[-1],
    }
    if len(spatial) == 3:  # auto is the fused Hopper backward: against dQ as its own kernel
      own = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel")
      variants = {
          "auto": lambda: (quarters("auto"), min_dead(default_min), fn(None))[-1],
          "dq_kernel_quarters": lambda: (quarters("auto"), min_dead(0.0),
                                         fn(own))[-1],
          "dq_kernel_no_quarters": lambda: (quarters(False),
                                            min_dead(default_min), fn(own))[-1]}
    row = {"case": name, "batch": b, "heads": h, "head_dim": d}
    grads = interleaved(row, variants, big, rounds=2)
    for v in list(variants)[1:]:
      row[f"{v}_vs_auto_rel_diff"] = max_rel_diff(grads[v], grads["auto"])
    quarters("auto")
    min_dead(default_min)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
