"""The dQ kernel over window-anchored KV boxes (`attention_bwd.WINDOW_DQ`) against the same
kernel over the backward plan's map (the shifted key grid, `ops._backward_plan`), on the
strided 3-D neighborhood (16x64x64, k(8,16,16), stride (4,8,8), B=1, H=16, D=128 bf16) and
its GQA 16/4 form: gradients against float32 XLA at 16x32x32 (H=4), the variants' gradients
against each other at full size, and fwd / fwd+bwd ms interleaved over rounds.

    python -m benchmarks.diag.diag_window_dq --out x.json
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import Rows, case_parser, interleaved, knob_setter, max_rel_diff
from ..bench_gpu import fwd_bwd, rel

KERNEL, STRIDE = (8, 16, 16), (4, 8, 8)
CASES = {"strided": 16, "strided_gqa": 4}  # name: kv heads (H=16)


def _inputs(spatial, heads, kv_heads, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, do = (jax.random.normal(x, (1, *spatial, heads, 128), dtype) for x in ks[:2])
  k, v = (jax.random.normal(x, (1, *spatial, kv_heads, 128), dtype) for x in ks[2:])
  return q, k, v, do


def main():
  args = case_parser(",".join(CASES)).parse_args()
  rows = Rows()
  setter = knob_setter(attention_bwd, "WINDOW_DQ")
  run = lambda backend="mosaic_gpu": (lambda q, k, v: jsa.na3d(q, k, v, KERNEL, stride=STRIDE,
                                                                backend=backend))
  for name in args.cases.split(","):
    hkv = CASES[name]
    row = {"case": name, "heads": f"16/{hkv}"}
    small = _inputs((16, 32, 32), 4, 4 * hkv // 16, jnp.bfloat16, seed=1)
    want = fwd_bwd(run("xla"))(*(x.astype(jnp.float32) for x in small))
    for on in (True, False):
      setter(on)
      got = fwd_bwd(run())(*small)
      row[f"window_{on}_rel_err_vs_xla_f32"] = {
          n: round(rel(g, w), 5) for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    big = _inputs((16, 64, 64), 16, hkv, jnp.bfloat16)
    variants = {"window": lambda: (setter(True), run())[1],
                "map": lambda: (setter(False), run())[1]}
    grads = interleaved(row, variants, big, rounds=3)
    row["window_vs_map_rel_diff"] = max_rel_diff(grads["window"], grads["map"])
    setter(True)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
