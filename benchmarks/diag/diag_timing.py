"""How much of a short step `time_ms` measures is its own start and end (the first call's
dispatch and the final wait, counted in the mean of a repeat's back-to-back calls): the
fwd+bwd step timed with 10 calls per repeat (the benchmarks' default) and with 50,
interleaved over three rounds, backend "auto". H200, 2026-12-04: no difference (the LM layer
0.94-0.98 vs 0.96-0.97 ms; docs/performance.md).

    python -m benchmarks.diag.diag_timing --out x.json [--cases lm,window,causal]
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn.demo import time_ms

from . import Rows, case_parser
from ..bench_gpu import fwd_bwd, inputs
from .profile_step import CASES


def main():
  args = case_parser("lm,window,causal").parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    mask, b, s, h, hkv, d, _ = CASES[name]
    big = inputs((b, s, h, d), (b, s, hkv, d), jnp.bfloat16)
    step = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask))
    jax.block_until_ready(step(*big))
    row = {"case": name}
    for rnd in range(3):
      for iters in (10, 50):
        row[f"iters{iters}_ms_{rnd}"] = round(time_ms(step, *big, iters=iters, repeats=5), 4)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
