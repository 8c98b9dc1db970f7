"""Neighborhoods with a padding mask on the Hopper forward: Q/K/V as TMA boxes of the
caller's layout with the segment vectors per kernel position (`attention_fwd.BOX_SEGMENTS`)
against the permuted copies into kernel order (the form before), Triton's kernels and the
unpadded neighborhood. fwd and fwd+bwd ms (the backward is `auto`'s for the mask), the
variants interleaved over two rounds; gradients at a smaller size against float32 XLA, and
the box path against Triton's at full size. ``--compare backward``: the Hopper forward
(boxes) with each backward forced (Triton's, the Hopper one) beside all-Triton and the
unpadded neighborhood, for `auto`'s rule; ``--compare auto``: `backend="auto"` (the rule's
pick, on the GPU) beside all-Triton, the Hopper forward with Triton's backward and the
unpadded neighborhood, at ``--head-dim`` (heads halved above 128). (``--compare mma``, the
MMA bias with segment ids, ran at commit 2175991: docs/performance.md.)

    python -m benchmarks.diag.diag_na_padding --out x.json [--cases na2d_96,na2d_128,na3d]
        [--compare boxes|backward|auto] [--head-dim 128]
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import ops
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_fwd

from . import Rows, case_parser, interleaved, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs, rel_errors

# name: (spatial, kernel, batch, heads, padded keys along the last dim)
CASES = {
    "na2d_96": ((96, 96), (17, 17), 2, 16, 16),  # bench_na_extras' padded row
    "na2d_64_k25": ((64, 128), (25, 25), 2, 16, 16),
    "na2d_64_k13": ((64, 64), (13, 13), 8, 16, 8),
    "na2d_128": ((128, 128), (33, 33), 2, 16, 24),
    "na3d": ((16, 64, 64), (8, 16, 16), 1, 16, 8),
    "na3d_k4x9": ((16, 64, 64), (4, 9, 9), 1, 16, 8),
}
D = 128
DEFAULT = attention_fwd.BOX_SEGMENTS


def padding(batch, spatial, pad):
  """kv_valid [batch, *spatial]: the last `pad` positions of the last dim are padding."""
  valid = np.arange(spatial[-1]) < spatial[-1] - pad
  return jnp.asarray(np.broadcast_to(valid, (batch, *spatial)))


def run(kernel, valid, backend, backward=None):
  config = None if backward is None else MosaicGPUConfig(backward=backward)
  return lambda q, k, v: jsa.na(q, k, v, kernel, kv_valid=valid, backend=backend,
                                config=config)


def set_forms(boxes: bool):
  attention_fwd.BOX_SEGMENTS = boxes
  ops._make_core.cache_clear()
  jax.clear_caches()


def main():
  parser = case_parser("na2d_96,na2d_128,na3d")
  parser.add_argument("--compare", default="boxes", choices=["boxes", "backward", "auto"])
  parser.add_argument("--head-dim", type=int, default=D)
  args = parser.parse_args()
  d = args.head_dim
  rows = Rows()
  for name in args.cases.split(","):
    spatial, kernel, b, h, pad = CASES[name]
    h = h if d <= 128 else h // 2
    row = {"case": name, "spatial": spatial, "kernel": kernel, "batch": b, "heads": h,
           "head_dim": d, "padded": pad}
    # Gradients at a smaller size (batch 1, 4 heads) against float32 XLA (the box path).
    small_spatial = (8, 32, 32) if len(spatial) == 3 else (48, 64)
    small = inputs((1, *small_spatial, 4, d), (1, *small_spatial, 4, d), jnp.bfloat16, seed=1)
    small_valid = padding(1, small_spatial, pad)
    f32 = [x.astype(jnp.float32) for x in small]
    want = fwd_bwd(run(kernel, small_valid, "xla"))(*f32)
    set_forms(True)
    got = fwd_bwd(run(kernel, small_valid,
                      "auto" if args.compare == "auto" else "mosaic_gpu"))(*small)
    row["rel_err_vs_xla_f32"] = rel_errors(got, want, digits=5)
    big = inputs((b, *spatial, h, d), (b, *spatial, h, d), jnp.bfloat16)
    valid = padding(b, spatial, pad)
    # name: (BOX_SEGMENTS, kv_valid, backend, backward); all-Triton and unpadded last.
    variants = {
        "auto": {"auto": (True, valid, "auto", None),
                 "hopper_fwd_triton_bwd": (True, valid, "mosaic_gpu", "triton")},
        "backward": {"boxes": (True, valid, "mosaic_gpu", "triton"),
                     "hopper_backward": (True, valid, "mosaic_gpu", "mosaic_gpu")},
        "boxes": {"boxes": (True, valid, "mosaic_gpu", None),
                  "permuted": (False, valid, "mosaic_gpu", None)},
    }[args.compare]
    first, other = variants
    variants["triton"] = (True, valid, "triton", None)
    variants["unpadded"] = (True, None, "auto" if args.compare == "auto" else "mosaic_gpu",
                            None)

    def variant(boxes, kv_valid, backend, bwd):
      set_forms(boxes)
      return run(kernel, kv_valid, backend, bwd)

    grads = interleaved(row, {key: functools.partial(variant, *v)
                              for key, v in variants.items()}, big)
    row[f"{first}_vs_triton_rel_diff"] = max_rel_diff(grads[first], grads["triton"])
    row[f"{first}_vs_{other}_rel_diff"] = max_rel_diff(grads[first], grads[other])
    set_forms(DEFAULT)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
