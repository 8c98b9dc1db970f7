"""Explicit array masks (`masks.from_array`) on the GPU kernels: rows of several runs (a union
of row bounds, tested as intervals per term: the Hopper kernels' union test, Triton's through
`plan.intervals_per_term`) against the same mask written as a structured spec. Gradients at
S=2048 against float32 XLA on the structured mask; fwd and fwd+bwd ms at S=8192, B=2, H=16,
D=128 bf16 (GQA 16/4), array and spec interleaved over two rounds. Triton's spec runs with
`triton_attention.UNION_TERMS` off (the mask function on kernel positions; where the spec
holds row bounds, per term all the same), so its two columns compare the two union forms.

    python -m benchmarks.diag.diag_array_masks --out x.json
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.gpu import triton_attention

from ..bench_gpu import (fwd_bwd, header, inputs, record, rel_errors, timeit,
                         write_results)

LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))


def three_runs(s, seed=0):
  """A causal window of 512, 4 sinks and one random run of 256 earlier keys per row (rows
  of up to 3 runs), as a spec: the random runs are `from_row_bounds`."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, s, s)
  lo, hi = np.minimum(start, np.arange(s)), np.minimum(start + 255, np.arange(s))
  return LM | masks.from_row_bounds(lo, hi, s)


def dense(mask, s):
  return np.asarray(mask(np.arange(s)[:, None], np.arange(s)[None]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out")
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()
  head = header()
  print(head, flush=True)
  for name, spec_of in (("causal & (window 512 | 4 sinks)", lambda s: LM),
                        ("the same | a random run of 256 keys", three_runs)):
    for s, timed in ((2048, False), (8192, True)):
      spec = spec_of(s)
      arr = masks.from_array(dense(spec, s))
      assert len(masks.interval_terms(arr)) > 1, type(arr)
      q, k, v, do = inputs((2, s, 16, 128), (2, s, 4, 128), jnp.bfloat16)
      fn = lambda m, b: lambda q, k, v: jsa.attention(q, k, v, m, backend=b)
      if not timed:
        want = fwd_bwd(fn(spec, "xla"))(*(x.astype(jnp.float32) for x in (q, k, v, do)))
        for backend in ("mosaic_gpu", "triton"):
          got = fwd_bwd(fn(arr, backend))(q, k, v, do)
          record(case=name, seq=s, backend=backend, form="array",
                 **rel_errors(got, want, digits=4))
        continue
      for r in range(2):
        for backend in ("mosaic_gpu", "triton"):
          for form, m in (("array", arr), ("spec", spec)):
            triton_attention.UNION_TERMS = form == "array"  # read when each jit traces
            record(case=name, seq=s, backend=backend, form=form, round=r,
                   fwd_ms=timeit(jax.jit(fn(m, backend)), q, k, v, iters=args.iters),
                   fwd_bwd_ms=timeit(fwd_bwd(fn(m, backend)), q, k, v, do,
                                     iters=args.iters))
            triton_attention.UNION_TERMS = True
  write_results(args.out, head)


if __name__ == "__main__":
  main()
