"""Neighborhood backward variants on the Hopper kernels, one call: fwd+bwd ms of the benchmark
CLI's full-size cases (`backend="auto"`) with module knobs patched while each traces —
"fold" (defaults: rowsum(dO ∘ O) folded into dLSE in the caller's order, O not permuted,
`attention_bwd.FOLD_ROWSUM`), "permute_out" (O permuted into kernel order, the earlier
form), "fused" (the fused dQ forced, `FUSED_MIN_ENTRIES` = 0) — and each variant's gradients
against the first's.

    python -m benchmarks.diag.diag_fold_rowsum --cases gna1d,gna3d,strided --out x.json
"""

import jax.numpy as jnp

from jax_sparse_attn import ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import Rows, case_parser, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs
from ..cli import suites

VARIANTS = {
    "fold": {"FOLD_ROWSUM": True},
    "permute_out": {"FOLD_ROWSUM": False},
    "fused": {"FOLD_ROWSUM": True, "FUSED_MIN_ENTRIES": 0},
}


def main():
  parser = case_parser("gna1d,gna3d,strided")
  parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants")
  args = parser.parse_args()
  built = suites(quick=False)
  rows = Rows()
  for suite in args.cases.split(","):
    for case in built[suite]():
      q, k, v, do = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
      row, ref, steps = {"case": case.name}, None, {}
      for name, patch in VARIANTS.items():
        saved = {key: getattr(attention_bwd, key) for key in patch}
        try:
          for key, value in patch.items():
            setattr(attention_bwd, key, value)
          ops._make_core.cache_clear()
          steps[name] = fwd_bwd(lambda q, k, v: case.run(q, k, v, "auto"))
          grads = steps[name](q, k, v, do)
          ref = grads if ref is None else ref
          row[name] = {"rel_diff_vs_first": max_rel_diff(grads, ref), "fwd_bwd_ms": []}
        except Exception as e:  # noqa: BLE001 - a failing variant is a result
          row[name] = repr(e)[:300]
        finally:
          for key, value in saved.items():
            setattr(attention_bwd, key, value)
          ops._make_core.cache_clear()
      for _ in range(args.repeats):  # interleaved rounds: drift hits every variant alike
        for name, step in steps.items():
          row[name]["fwd_bwd_ms"].append(round(time_ms(step, q, k, v, do, iters=5, repeats=5),
                                               3))
      rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
