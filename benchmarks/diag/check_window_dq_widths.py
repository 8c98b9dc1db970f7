"""The dQ kernel's window boxes at other head dims than 128 (64: one column part; 96: three
of 32 columns) and in float16, GQA 4/1: output and gradients of strided 3-D neighborhoods
(8x32x32, k(4,16,16), stride (2,8,8)) against float32 XLA, with the path checked to run.

    python -m benchmarks.diag.check_window_dq_widths --out x.json
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import Rows, case_parser
from ..bench_gpu import fwd_bwd, rel_errors


def main():
  args = case_parser("").parse_args()
  rows = Rows()
  ran = []
  window = attention_bwd._dq_window
  attention_bwd._dq_window = lambda *a: (ran.append(window(*a)), ran[-1])[1]
  f = lambda be: (lambda q, k, v: jsa.na3d(q, k, v, (4, 16, 16), stride=(2, 8, 8), backend=be))
  for d, dtype, hkv in ((64, jnp.bfloat16, 1), (96, jnp.bfloat16, 1), (128, jnp.float16, 1),
                        (128, jnp.bfloat16, 4)):
    ks = jax.random.split(jax.random.PRNGKey(d), 4)
    q, do = (jax.random.normal(x, (1, 8, 32, 32, 4, d), dtype) for x in ks[:2])
    k, v = (jax.random.normal(x, (1, 8, 32, 32, hkv, d), dtype) for x in ks[2:])
    ran.clear()
    got = fwd_bwd(f("mosaic_gpu"))(q, k, v, do)
    want = fwd_bwd(f("xla"))(*(x.astype(jnp.float32) for x in (q, k, v, do)))
    rows.record(head_dim=d, dtype=jnp.dtype(dtype).name, kv_heads=hkv,
                window_dq=bool(ran) and all(r is not None for r in ran),
                rel_err_vs_xla_f32=rel_errors(got, want, digits=5))
  rows.write(args.out)


if __name__ == "__main__":
  main()
