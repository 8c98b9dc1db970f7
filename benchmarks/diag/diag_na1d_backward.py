"""1-D neighborhoods' backward on Hopper: fwd+bwd ms of `jsa.na1d` with the Hopper backward
(`MosaicGPUConfig()`: `config.hopper_backward_neighborhood` takes 1-D) against the Triton
one (`MosaicGPUConfig(backward="triton")`, the earlier default), both on the Hopper forward,
with the gradients' relative difference between the two; bf16, H=16, D=128. A case whose
name is in --cases runs (the headline's `gna1d` is "k2049").

    python -m benchmarks.diag.diag_na1d_backward --out na1d.json
"""

import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import ops
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import MosaicGPUConfig

from . import Rows, case_parser, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs

CASES = {  # name: (batch, seq, kernel, dilation, causal)
    "k2049": (2, 32768, 2049, 1, False),
    "k513_causal": (2, 16384, 513, 1, True),
    "k129_dilation4": (2, 16384, 129, 4, False),
    "k129": (2, 16384, 129, 1, False),
    "k257": (2, 16384, 257, 1, False),
    "k385_causal": (2, 16384, 385, 1, True),
}


def main():
  parser = case_parser(",".join(CASES))
  args = parser.parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    b, s, kernel, dilation, causal = CASES[name]
    q, k, v, do = inputs((b, s, 16, 128), (b, s, 16, 128), jnp.bfloat16)
    row, ref = {"case": name}, None
    for variant, config in (("triton_backward", MosaicGPUConfig(backward="triton")),
                            ("hopper_backward", MosaicGPUConfig())):
      ops._make_core.cache_clear()
      run = lambda q, k, v, c=config: jsa.na1d(q, k, v, kernel, dilation=dilation,
                                               is_causal=causal, backend="mosaic_gpu", config=c)
      try:
        step = fwd_bwd(run)
        grads = step(q, k, v, do)
        if ref is None:
          ref = grads
        row[variant] = {"fwd_bwd_ms": round(time_ms(step, q, k, v, do, iters=5, repeats=5), 3),
                        "rel_diff_vs_triton": max_rel_diff(grads, ref)}
      except Exception as e:  # noqa: BLE001 - a failing variant is a result
        row[variant] = repr(e)[:300]
    rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
