"""head_dim 129-256 on the Hopper backward (`attention_bwd_wide`, the role-split kernels)
against the Triton backward it replaces, both after the Hopper forward, beside cuDNN: ms
forward and fwd+bwd, and each variant's gradients against the float32 XLA backend at a
smaller length of the same case in the same call. bf16, H=16.
``--padded``: also each case at its head dim's width before it had its own (`native_widths`:
192 at 256, 160 at 192).

    python -m benchmarks.diag.diag_wide_backward --out wide.json
    python -m benchmarks.diag.diag_wide_backward --cases causal_d192,dense_d192 --padded
"""

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, ops
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd_wide

from . import Rows, case_parser, check_and_time, native_widths
from ..bench_gpu import fwd_bwd, inputs

CASES = {  # name: (batch, seq, kv heads, head_dim, mask, cuDNN kwargs or None, check seq)
    "causal_d256": (2, 8192, 16, 256, masks.causal(), dict(is_causal=True), 2048),
    "dense_d256": (2, 8192, 16, 256, masks.full(), dict(), 2048),
    "causal_d192": (2, 8192, 16, 192, masks.causal(), dict(is_causal=True), 2048),
    "dense_d192": (2, 8192, 16, 192, masks.full(), dict(), 2048),
    "causal_d160": (2, 8192, 16, 160, masks.causal(), dict(is_causal=True), 2048),
    "window4096_gqa_d192": (1, 32768, 8, 192, masks.causal() & masks.sliding_window(4096),
                            dict(is_causal=True, local_window_size=(4095, 0)), 8192),
    "lm_d128": (2, 8192, 4, 128, masks.causal() & (masks.sliding_window(512) | masks.sink(4)),
                None, 2048),
    "lm_d192": (2, 8192, 4, 192, masks.causal() & (masks.sliding_window(512) | masks.sink(4)),
                None, 2048),
    "window4096_gqa_d256": (1, 32768, 8, 256, masks.causal() & masks.sliding_window(4096),
                            dict(is_causal=True, local_window_size=(4095, 0)), 8192),
    "lm_d256": (2, 8192, 4, 256, masks.causal() & (masks.sliding_window(512) | masks.sink(4)),
                None, 2048),
}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--registers", action="store_true",
                      help="also 240/24 registers for the role-split kernels")
  parser.add_argument("--padded", action="store_true",
                      help="also each case at its previous width (192 at 256, 160 at 192)")
  parser.add_argument("--no-triton", action="store_true", help="skip the Triton backward")
  parser.add_argument("--stages", type=int, default=None,
                      help="also the role-split kernels with this many Q/dO and K/V slots "
                           "(192-column cases only: 256 has no room for a third)")
  args = parser.parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    b, s, hkv, d, mask, cudnn, s_check = CASES[name]
    heads = 16
    big = inputs((b, s, heads, d), (b, s, hkv, d), jnp.bfloat16)
    small = inputs((b, s_check, heads, d), (b, s_check, hkv, d), jnp.bfloat16, seed=1)
    ref = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"))(
        *(x.astype(jnp.float32) for x in small))
    regs0 = attention_bwd_wide.REGISTERS
    variants = {"hopper_backward": (MosaicGPUConfig(), regs0, True)}
    if args.padded and d < 256:
      variants["hopper_backward_padded"] = (MosaicGPUConfig(), regs0, False)
    if not args.no_triton:
      variants["triton_backward"] = (MosaicGPUConfig(backward="triton"), regs0, True)
    if args.registers:
      variants["hopper_backward_240_24"] = (MosaicGPUConfig(), (240, 24), True)
    if args.stages and d <= 192:
      variants[f"hopper_backward_stages_{args.stages}"] = (MosaicGPUConfig(), regs0, True,
                                                           args.stages)
    impls = {}
    for v_name, (config, regs, native, *stages) in variants.items():
      impls[v_name] = (lambda q, k, v, c=config: jsa.attention(
          q, k, v, mask, backend="mosaic_gpu", config=c), regs, native, *stages)
    if cudnn is not None:
      impls["cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, implementation="cudnn", **cudnn), None, True)
    for impl, (fn, regs, native, *stages) in impls.items():
      row = dict(case=name, impl=impl, batch=b, seq=s, heads=heads, kv_heads=hkv, head_dim=d)
      saved, saved_stages = attention_bwd_wide.REGISTERS, attention_bwd_wide.STAGES
      try:
        if regs is not None:
          attention_bwd_wide.REGISTERS = regs
        native_widths(native, d)
        attention_bwd_wide.STAGES = stages[0] if stages else saved_stages
        ops._make_core.cache_clear()
        check_and_time(row, fn, small, ref, big)
      except Exception as e:  # noqa: BLE001 (a path that fails is a result)
        row["error"] = repr(e)[:400]
      finally:
        attention_bwd_wide.REGISTERS = saved
        native_widths(True)
        attention_bwd_wide.STAGES = saved_stages
      rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
