"""How much of a short step `time_ms` measured was its own start and end: the fwd+bwd step
timed as before (10 back-to-back calls per repeat: the first call's dispatch and the final
wait counted in the mean) and with `demo.MIN_REPEAT_MS` (as many calls as take 50 ms),
interleaved over three rounds, backend "auto".

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
      row[f"iters10_ms_{rnd}"] = round(time_ms(step, *big, iters=10, repeats=5,
                                               min_repeat_ms=0), 4)
      row[f"min50ms_ms_{rnd}"] = round(time_ms(step, *big, iters=10, repeats=5), 4)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
