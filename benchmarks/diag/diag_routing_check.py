"""`auto`'s backward against the alternative it replaced, interleaved in one call: 2-D NA
128² k33 (B=2, H=16, D=128; Hopper backward with quarter skips vs Triton's) and 3-D NA
16×64² k8×16² (B=1; dQ its own kernel with quarter skips vs the fused form). fwd / fwd+bwd
ms over rounds, gradients of the two against each other.

    python -m benchmarks.diag.diag_routing_check --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig

from . import Rows, case_parser, interleaved, max_rel_diff
from ..bench_gpu import inputs

CASES = {"na2d_k33": ((128, 128), 33, 2, MosaicGPUConfig(backward="triton")),
         "na3d": ((16, 64, 64), (8, 16, 16), 1, MosaicGPUConfig(backward_dq="split"))}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    spatial, kern, b, other = CASES[name]
    fn = lambda cfg: (lambda q, k, v: jsa.na(q, k, v, kern, backend="mosaic_gpu", config=cfg))
    big = inputs((b, *spatial, 16, 128), (b, *spatial, 16, 128), jnp.bfloat16)
    row = {"case": name}
    grads = interleaved(row, {"auto": lambda: fn(None), "before": lambda: fn(other)}, big,
                        rounds=args.rounds)
    row["rel_diff"] = max_rel_diff(grads["auto"], grads["before"])
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
