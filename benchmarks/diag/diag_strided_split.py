"""Where the strided 3-D neighborhood's backward goes (16x64x64, k(8,16,16), stride (4,8,8),
B=1, H=16, D=128 bf16, `backend="mosaic_gpu"`): the forward with window-anchored KV boxes and
on the grid, fwd+bwd with both backward kernels in one launch and in two, and with the dQ
kernel replaced by zeros (the dK/dV kernel alone), beside the 3-D NA of the same kernel
without stride; each case's visited blocks per head (forward map, backward map).

    python -m benchmarks.diag.diag_strided_split --out x.json
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq

from . import Rows, case_parser
from ..bench_gpu import fwd_bwd

CASES = {"strided": ((16, 64, 64), (8, 16, 16), (4, 8, 8)),
         "na3d": ((16, 64, 64), (8, 16, 16), (1, 1, 1))}


def _patched(patch: dict, fn):
  """fn() with module attributes patched (and the traced-kernel caches cleared) meanwhile."""
  saved = {k: getattr(m, a) for k, (m, a, _) in patch.items()}
  try:
    for m, a, v in patch.values():
      setattr(m, a, v)
    ops._make_core.cache_clear()
    jax.clear_caches()
    return fn()
  finally:
    for k, (m, a, _) in patch.items():
      setattr(m, a, saved[k])
    ops._make_core.cache_clear()
    jax.clear_caches()


def main():
  args = case_parser(",".join(CASES)).parse_args()
  rows = Rows()
  h, d = 16, 128
  for name in args.cases.split(","):
    spatial, kern, stride = CASES[name]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(x, (1, *spatial, h, d), jnp.bfloat16) for x in ks)
    run = lambda cfg=None: (lambda q, k, v: jsa.na(q, k, v, kern, stride, backend="mosaic_gpu",
                                                   config=cfg))
    row = {"case": name}
    timed = lambda f, *a: round(time_ms(f, *a, iters=10, repeats=7), 4)
    row["fwd_ms"] = _patched({}, lambda: timed(jax.jit(run()), q, k, v))
    row["fwd_grid_ms"] = _patched({}, lambda: timed(
        jax.jit(run(MosaicGPUConfig(kv_windows=False))), q, k, v))
    row["fwd_bwd_ms"] = _patched({}, lambda: timed(fwd_bwd(run()), q, k, v, do))
    row["fwd_bwd_two_launches_ms"] = _patched(
        {"j": (attention_bwd, "JOINT_DQ", False)}, lambda: timed(fwd_bwd(run()), q, k, v, do))
    no_dq = lambda q, *a, **kw: jnp.zeros((q.shape[0], a[3].shape[-1], *q.shape[2:]), q.dtype)
    row["fwd_bwd_no_dq_ms"] = _patched(
        {"j": (attention_bwd, "JOINT_DQ", False), "dq": (attention_bwd_dq, "dq", no_dq)},
        lambda: timed(fwd_bwd(run()), q, k, v, do))
    row["dq_ms_by_difference"] = round(row["fwd_bwd_two_launches_ms"]
                                       - row["fwd_bwd_no_dq_ms"], 4)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
