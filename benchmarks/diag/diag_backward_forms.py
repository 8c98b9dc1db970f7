"""Which backward form per mask: fwd+bwd ms of the benchmark CLI's full-size cases (backend
"mosaic_gpu", its defaults) with module knobs patched while each traces: dQ as its own
kernel everywhere (the defaults before FUSED_MIN_ENTRIES), fused everywhere at head_dim 128
(the defaults take one of the two by `policy.FUSED_MIN_ENTRIES`), cuDNN beside dense
and causal; strided neighborhoods with and without the shifted key grid
(`ops.SHIFTED_KV`) on the Triton and the Hopper backward, and the fused form there instead
of dQ on window boxes; `--variants kernel,fused,fused_quarters` adds the fused form that skips
dead quarters; a gradient check of each variant against the first. ("kernel" also
lifts `FUSED_MIN_ENTRIES_SHORT`, added 2026-12-07 after the calls that set it.)

    python -m benchmarks.diag.diag_backward_forms --cases window,routing,strided --out x.json
"""
import json

import jax
import jax.numpy as jnp

from jax_sparse_attn import ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu.mosaic_gpu import policy

from . import case_parser, hopper_backward_forced, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs
from ..cli import suites

BIG = 10 ** 9
VARIANTS = {
    "kernel": {(policy, "FUSED_MIN_ENTRIES"): BIG, (policy, "FUSED_MIN_ENTRIES_SHORT"): BIG,
               (ops, "SHIFTED_KV"): False},
    "fused": {(policy, "FUSED_MIN_ENTRIES"): 0, (ops, "SHIFTED_KV"): False},
    # the fused form skipping dead quarters too (`policy.FUSED_QUARTERS`), where maps have them
    "fused_quarters": {(policy, "FUSED_MIN_ENTRIES"): 0, (policy, "FUSED_QUARTERS"): True,
                       (ops, "SHIFTED_KV"): False},
}
PEERS = ("dense", "causal")  # cuDNN beside them (jax.nn.dot_product_attention)
STRIDED = {
    "triton_grid": {(ops, "SHIFTED_KV"): False},
    "triton_shifted": {(ops, "SHIFTED_KV"): True},
    "hopper_grid": {(ops, "SHIFTED_KV"): False, "hopper": True},
    "hopper_shifted": {(ops, "SHIFTED_KV"): True, "hopper": True},
    # the fused form instead of the two kernels with dQ on window boxes (the default)
    "hopper_shifted_fused": {(ops, "SHIFTED_KV"): True, "hopper": True,
                             (policy, "FUSED_MIN_ENTRIES"): 0},
}


def main():
  parser = case_parser("strided,gna3d,routing,dense,causal,window,blocksparse")
  parser.add_argument("--all-sizes", action="store_true",
                      help="dense and causal at every size (default: S=16384 only)")
  parser.add_argument("--variants", default="kernel,fused",
                      help=f"of {sorted(VARIANTS)} for the non-strided cases")
  args = parser.parse_args()
  built = suites(quick=False)
  rows = []
  for suite in args.cases.split(","):
    for case in built[suite]():
      if suite in ("dense", "causal") and "16384" not in case.name and not args.all_sizes:
        continue
      q, k, v, do = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
      variants = (STRIDED if suite == "strided"
                  else {n: VARIANTS[n] for n in args.variants.split(",")})
      row = {"case": case.name}
      ref = None
      for name, patch in variants.items():
        saved = {key: getattr(*key) for key in patch if key != "hopper"}
        try:
          for key, value in patch.items():
            if key != "hopper":
              setattr(*key, value)
          ops._make_core.cache_clear()
          with hopper_backward_forced(patch.get("hopper", False)):
            step = fwd_bwd(lambda q, k, v: case.run(q, k, v, "mosaic_gpu"))
            grads = step(q, k, v, do)
            ref = grads if ref is None else ref
            row[name] = {"fwd_bwd_ms": round(time_ms(step, q, k, v, do, iters=5, repeats=5), 3),
                         "rel_diff_vs_first": max_rel_diff(grads, ref)}
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result
          row[name] = repr(e)[:300]
        finally:
          for key, value in saved.items():
            setattr(*key, value)
          ops._make_core.cache_clear()
      if suite in PEERS:
        cudnn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=suite == "causal", implementation="cudnn")
        try:
          row["cudnn"] = {"fwd_bwd_ms": round(time_ms(fwd_bwd(cudnn), q, k, v, do, iters=5,
                                                      repeats=5), 3)}
        except Exception as e:  # noqa: BLE001
          row["cudnn"] = repr(e)[:300]
      print(json.dumps(row), flush=True)
      rows.append(row)
  if args.out:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, open(args.out, "w"),
              indent=1)


if __name__ == "__main__":
  main()
