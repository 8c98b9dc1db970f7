"""Ring depth of the Hopper backward's two kernels on short lists: fwd+bwd ms of the benchmark
CLI's full-size cases (backend "mosaic_gpu") per (Q/dO slots of the dK/dV kernel, K/V slots of
the dQ kernel) = (`policy.STAGES`, `attention_bwd_dq.STAGES`); the default first and
again last (the call's drift), each variant's gradients against the first's. 2-D
neighborhoods with the Hopper backward forced (`auto` takes Triton's there) and as `auto` runs
them.

    python -m benchmarks.diag.diag_backward_stages --out x.json [--cases gna2d,strided]
"""
import json

import jax
import jax.numpy as jnp

from jax_sparse_attn import ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu.mosaic_gpu import attention_bwd_dq, policy

from . import case_parser, hopper_backward_forced, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs
from ..cli import suites

VARIANTS = ((2, 2), (3, 2), (4, 2), (2, 2))  # dQ at 3 slots: 263 KB of shared memory


def main():
  parser = case_parser("gna2d,strided,window,blocksparse")
  args = parser.parse_args()
  built = suites(quick=False)
  rows = []
  for suite in args.cases.split(","):
    for case in built[suite]():
      q, k, v, do = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
      for forced in ((False, True) if suite == "gna2d" else (False,)):
        row = {"case": case.name, "hopper_backward_forced": forced}
        ref = None
        with hopper_backward_forced(forced):
          for i, (dkv, dq) in enumerate(VARIANTS):
            name = f"dkv{dkv}_dq{dq}" + ("_again" if i == len(VARIANTS) - 1 else "")
            policy.STAGES, attention_bwd_dq.STAGES = dkv, dq
            ops._make_core.cache_clear()
            try:
              step = fwd_bwd(lambda q, k, v: case.run(q, k, v, "mosaic_gpu"))
              grads = step(q, k, v, do)
              ref = grads if ref is None else ref
              row[name] = {"fwd_bwd_ms": round(time_ms(step, q, k, v, do, iters=5, repeats=7),
                                               3),
                           "rel_diff_vs_first": max_rel_diff(grads, ref)}
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result
              row[name] = repr(e)[:300]
        policy.STAGES, attention_bwd_dq.STAGES = 2, 2
        ops._make_core.cache_clear()
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
          json.dump({"device": jax.devices()[0].device_kind, "rows": rows},
                    open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
