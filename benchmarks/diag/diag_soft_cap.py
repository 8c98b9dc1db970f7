"""The cost of logit soft-capping (`logits_soft_cap=50`, Gemma 2) in the default (`auto`)
kernels: a tanh per score in the forward and both backward kernels, and the capped score
kept for dS's slope. Per case: the capped call's output and gradients (bf16) against the
float32 XLA backend at a small size, then fwd / fwd+bwd ms with and without the cap,
interleaved.

    python -m benchmarks.diag.diag_soft_cap --out x.json
"""
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks

from . import Rows, case_parser, interleaved, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs

CAP = 50.0
# name: (fn(q, k, v, cap, backend), big (q, kv) shapes, small (q, kv) shapes)
CASES = {
    "causal_16k": (lambda q, k, v, cap, backend: jsa.attention(
        q, k, v, masks.causal(), logits_soft_cap=cap, backend=backend),
                   ((2, 16384, 16, 128),) * 2, ((1, 2048, 4, 128),) * 2),
    "window_32k": (lambda q, k, v, cap, backend: jsa.attention(
        q, k, v, masks.causal() & masks.sliding_window(2048), logits_soft_cap=cap,
        backend=backend), ((1, 32768, 16, 128),) * 2, ((1, 4096, 4, 128),) * 2),
    "na2d_k33": (lambda q, k, v, cap, backend: jsa.na(q, k, v, 33, logits_soft_cap=cap,
                                                      backend=backend),
                 ((2, 128, 128, 16, 128),) * 2, ((1, 64, 64, 4, 128),) * 2),
}


def main():
  args = case_parser(",".join(CASES)).parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    fn, big_shapes, small_shapes = CASES[name]
    row = {"case": name, "cap": CAP}
    small = inputs(*small_shapes, jnp.bfloat16)
    got = fwd_bwd(lambda q, k, v: fn(q, k, v, CAP, "auto"))(*small)
    want = fwd_bwd(lambda q, k, v: fn(q, k, v, CAP, "xla"))(
        *[x.astype(jnp.float32) for x in small])
    row["rel_diff_vs_xla_f32"] = max_rel_diff(got, want)
    big = inputs(*big_shapes, jnp.bfloat16)
    interleaved(row, {"no_cap": lambda: (lambda q, k, v: fn(q, k, v, None, "auto")),
                      "cap": lambda: (lambda q, k, v: fn(q, k, v, CAP, "auto"))}, big,
                rounds=2)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
