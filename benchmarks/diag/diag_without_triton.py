"""What leaving Pallas' Triton lowering costs (`triton_attention.available`, ``JSA_TRITON=0``):
`auto` on the calls it runs (partly) on the Triton kernels today, against the same calls
with them gone, where the Hopper kernels take the forward of padded neighborhoods and the
backward of short 2-D/3-D/1-D windows, strided 2-D ones, head_dim 32 and packed grids.
Variants, fwd / fwd+bwd ms interleaved (two rounds), the second's gradients against the
first's:

- ``auto``: today's choice (Triton's backward for these cases, Triton's forward with a
  padding mask on 2-D windows under 256 keys and 3-D ones under 1024);
- ``no_triton``: the same call traced with the Triton kernels unavailable.

(``narrow``, the role-split kernels on 64-key blocks at head_dim 128, ran at commit cb67df0;
padded calls' backward tiles chosen without the MMA-bias preference, a two-line change of
`cost.backward_tile_shapes` measured on 3594705 and dropped: docs/performance.md.)

    python -m benchmarks.diag.diag_without_triton --cases k7_d64,k17_dil4 --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import triton_attention

from . import Rows, case_parser, interleaved_vs_first, knob_setter
from ..bench_gpu import inputs

# name: (spatial, kernel, stride, dilation, batch, heads, head_dim, padded last columns)
CASES = {"k7_d64": ((56, 56), 7, 1, 1, 16, 8, 64, 0),
         "k7_d32": ((56, 56), 7, 1, 1, 64, 4, 32, 0),
         "k13_d128": ((64, 64), 13, 1, 1, 8, 16, 128, 0),
         "k17_dil4": ((128, 128), 17, 1, 4, 2, 16, 128, 0),
         "k32_s16": ((128, 128), 32, 16, 1, 2, 16, 128, 0),
         "k17_padded": ((96, 96), 17, 1, 1, 2, 16, 128, 16),
         "k17_dil4_padded": ((128, 128), 17, 1, 4, 2, 16, 128, 16),
         "k7_d64_padded": ((56, 56), 7, 1, 1, 16, 8, 64, 8),
         "k25_padded": ((64, 128), 25, 1, 1, 2, 16, 128, 16),
         "3d_3x9x9": ((8, 48, 48), (3, 9, 9), 1, 1, 4, 16, 128, 0),
         "1d_k129": ((32768,), 129, 1, 1, 2, 16, 128, 0),
         "packed_k13": (((64, 64), (48, 80), (32, 32)), 13, 1, 1, 2, 16, 128, 0)}


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--variants", default="auto,no_triton")
  args = parser.parse_args()
  rows = Rows()
  disabled = knob_setter(triton_attention, "_DISABLED_BY_ENV")
  for name in args.cases.split(","):
    spatial, kern, stride, dil, b, h, d, padded = CASES[name]
    packed = isinstance(spatial[0], tuple)
    tokens = (sum(a * c for a, c in spatial),) if packed else spatial
    valid = None
    if padded:
      valid = jnp.ones((b, *spatial), bool).at[..., spatial[-1] - padded:].set(False)

    def fn(off):
      disabled(off)
      if packed:
        return lambda q, k, v: jsa.na_packed(q, k, v, list(spatial), kern)
      return lambda q, k, v: jsa.na(q, k, v, kern, stride=stride, dilation=dil,
                                    kv_valid=valid)

    big = inputs((b, *tokens, h, d), (b, *tokens, h, d), jnp.bfloat16)
    row = {"case": name, "spatial": spatial, "kernel": kern, "stride": stride,
           "dilation": dil, "batch": b, "heads": h, "head_dim": d, "padded": padded}
    variants = {"auto": lambda: fn(False), "no_triton": lambda: fn(True)}
    interleaved_vs_first(row, {v: variants[v] for v in args.variants.split(",")},
                         big, rounds=args.rounds)
    disabled(False)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
