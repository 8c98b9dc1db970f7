"""Neighborhoods at head_dim 256 (or ``--head-dim``) on Hopper: fwd+bwd ms of the Triton
kernels (what `auto` ran there), the Hopper forward with the Triton backward, and the Hopper
forward with the role-split backward (`attention_bwd_wide`, element tests), with each
variant's gradients against the first; bf16, H=8 (``--heads``). ``--padded``: also the Hopper
backward at the head dim's width before it had its own (`native_widths`). At
head_dim <= 128 "hopper_fwd_wide_bwd" runs the 128-row backward kernels.

    python -m benchmarks.diag.diag_wide_na --out wide_na.json
    python -m benchmarks.diag.diag_wide_na --head-dim 192 --padded --out na192.json
"""

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import MosaicGPUConfig

from . import Rows, case_parser, max_rel_diff, native_widths
from ..bench_gpu import fwd_bwd, inputs

CASES = {  # name: (batch, spatial, kernel, stride)
    "na1d_k1025": (2, (16384,), (1025,), (1,)),
    "na2d_k33": (2, (96, 96), (33, 33), (1, 1)),
    "na2d_k33_128": (2, (128, 128), (33, 33), (1, 1)),  # the headline's (with --heads 16)
    "na2d_k7_56": (64, (56, 56), (7, 7), (1, 1)),  # NAT's first stage (head_dim 32)
    "na3d_k8x16": (1, (16, 32, 32), (8, 16, 16), (1, 1, 1)),
    "na2d_k13_64": (4, (64, 64), (13, 13), (1, 1)),  # 169 keys
    "na3d_k3x7": (2, (8, 32, 32), (3, 7, 7), (1, 1, 1)),  # 147 keys
    "na3d_k4x9": (2, (8, 32, 32), (4, 9, 9), (1, 1, 1)),  # 324 keys
    "na1d_k257": (2, (16384,), (257,), (1,)),
    "na2d_k17_96": (2, (96, 96), (17, 17), (1, 1)),  # 289 keys
}
VARIANTS = {  # name: (backend, config, columns at 129-192 native)
    "triton": ("triton", None, True),
    "hopper_fwd_triton_bwd": ("mosaic_gpu", MosaicGPUConfig(backward="triton"), True),
    "hopper_fwd_wide_bwd": ("mosaic_gpu", MosaicGPUConfig(backward="mosaic_gpu"), True),
}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--head-dim", type=int, default=256)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--padded", action="store_true")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="a subset of " + ",".join(VARIANTS))
  args = parser.parse_args()
  rows = Rows()
  variants = {name: VARIANTS[name] for name in args.variants.split(",")}
  if args.padded:
    variants["hopper_fwd_wide_bwd_padded"] = (
        "mosaic_gpu", MosaicGPUConfig(backward="mosaic_gpu"), False)
  for name in args.cases.split(","):
    b, spatial, kernel, stride = CASES[name]
    shape = (b, *spatial, args.heads, args.head_dim)
    q, k, v, do = inputs(shape, shape, jnp.bfloat16)
    row, ref = {"case": name, "head_dim": args.head_dim, "heads": args.heads}, None
    for variant, (backend, config, native) in variants.items():
      native_widths(native, args.head_dim)
      ops._make_core.cache_clear()
      fn = lambda q, k, v, be=backend, c=config: jsa.na(q, k, v, kernel, stride, backend=be,
                                                        config=c)
      try:
        grads = fwd_bwd(fn)(q, k, v, do)
        ref = grads if ref is None else ref
        row[variant] = {"fwd_ms": round(time_ms(jax.jit(fn), q, k, v, iters=5, repeats=5), 3),
                        "fwd_bwd_ms": round(time_ms(fwd_bwd(fn), q, k, v, do, iters=5,
                                                    repeats=5), 3),
                        "rel_diff_vs_first": max_rel_diff(grads, ref)}
      except Exception as e:  # noqa: BLE001 - a failing variant is a result
        row[variant] = repr(e)[:300]
      finally:
        native_widths(True)
    rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
