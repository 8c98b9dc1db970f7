"""Would head_dim 128 train faster on the role-split backward (`attention_bwd_wide`, 64-row
CTAs, warpgroups split by role) than on the 128-row kernels? The role-split kernels take plans
with 64-key KV blocks, so that variant runs `attention(..., block_kv=64)` (forward too): the
backward's share is fwd+bwd minus forward of the same variant. bf16, H=16; gradients against
the float32 XLA backend at a smaller length of the same case in the same call.

    python -m benchmarks.diag.diag_role_split_128 --out rs128.json
"""

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, ops
from pallas_kernels.gpu.mosaic_gpu import attention_bwd_wide

from . import Rows, case_parser, check_and_time
from ..bench_gpu import fwd_bwd, inputs

LM = masks.causal() & (masks.sliding_window(512) | masks.sink(4))
CASES = {  # name: (batch, seq, kv heads, mask, cuDNN kwargs or None, check seq)
    "causal_8k": (2, 8192, 16, masks.causal(), dict(is_causal=True), 2048),
    "dense_8k": (2, 8192, 16, masks.full(), dict(), 2048),
    "causal_16k": (2, 16384, 16, masks.causal(), dict(is_causal=True), 2048),
    "window2048_32k": (1, 32768, 16, masks.causal() & masks.sliding_window(2048),
                       dict(is_causal=True, local_window_size=(2047, 0)), 8192),
    "lm_gqa4_8k": (2, 8192, 4, LM, None, 2048),
}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--stages", default="2,3", help="role-split K/V and Q/dO slots to try")
  args = parser.parse_args()
  rows = Rows()
  saved = attention_bwd_wide.HEAD_DIMS, attention_bwd_wide.STAGES
  for name in args.cases.split(","):
    b, s, hkv, mask, cudnn, s_check = CASES[name]
    heads, d = 16, 128
    big = inputs((b, s, heads, d), (b, s, hkv, d), jnp.bfloat16)
    small = inputs((b, s_check, heads, d), (b, s_check, hkv, d), jnp.bfloat16, seed=1)
    ref = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"))(
        *(x.astype(jnp.float32) for x in small))
    variants = {"rows_128": (None, None)}  # (role-split stages or None, block_kv)
    for st in args.stages.split(","):
      variants[f"role_split_stages_{st}"] = (int(st), 64)
    impls = {v: (lambda q, k, v_, bk=bk: jsa.attention(q, k, v_, mask, backend="mosaic_gpu",
                                                        block_kv=bk), st)
             for v, (st, bk) in variants.items()}
    if cudnn is not None:
      impls["cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, implementation="cudnn", **cudnn), None)
    for impl, (fn, stages) in impls.items():
      row = dict(case=name, impl=impl, batch=b, seq=s, heads=heads, kv_heads=hkv, head_dim=d)
      try:
        if stages is not None:
          attention_bwd_wide.HEAD_DIMS = (128,) + saved[0]
          attention_bwd_wide.STAGES = stages
        ops._make_core.cache_clear()
        check_and_time(row, fn, small, ref, big)
        row["bwd_ms"] = round(row["fwd_bwd_ms"] - row["fwd_ms"], 3)
      except Exception as e:  # noqa: BLE001 (a path that fails is a result)
        row["error"] = repr(e)[:400]
      finally:
        attention_bwd_wide.HEAD_DIMS, attention_bwd_wide.STAGES = saved
      rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
