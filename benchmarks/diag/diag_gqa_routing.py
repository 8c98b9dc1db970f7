"""MoBA's S=32768 row at GQA 16/4 (pooled-score top 32 + 2 local of 256 blocks, selection
inside the timing) under the dK/dV work-item forms of runtime maps
(`work_items.RUNTIME_ITEMS`: "whole" lists, "chunks" with float32 reduce-adds, "auto"), the
per-head and the group-shared selection, beside MHA 16/16; gradients of each form against
"auto" at the same inputs.

    python -m benchmarks.diag.diag_gqa_routing --out gqa.json
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, routing
from pallas_kernels.gpu.mosaic_gpu import work_items

from ..bench_gpu import fwd_bwd, header, inputs, perf_row, record, rel, write_results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--seq", type=int, default=32768)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  head = header("bfloat16")
  record(**head)
  b, s, d, bs, top_k = 1, args.seq, 128, 128, 32
  for hkv, forms in ((4, ("auto", "whole", "chunks")), (16, ("auto",))):
    q, k, v, do = inputs((b, s, 16, d), (b, s, hkv, d), jnp.bfloat16)
    for shared in ((False, True) if hkv < 16 else (False,)):
      fn = lambda q, k, v, sh=shared: jsa.attention(
          q, k, v, masks.causal(), block_selection=routing.topk_blocks(
              q, k, bs, top_k, causal=True, local_blocks=2, shared_by_group=sh))
      base = None
      for rnd in range(args.rounds):
        for form in forms:
          work_items.RUNTIME_ITEMS = form
          name = f"MoBA S={s} GQA 16/{hkv}, selection {'shared' if shared else 'per head'}"
          if rnd == 0:
            got = fwd_bwd(fn)(q, k, v, do)
            if base is None:
              base = got
            record(section="check", case=name, form=form,
                   **{n: rel(a, c) for n, a, c in zip(("out", "dq", "dk", "dv"), got, base)})
          perf_row("perf", name, f"RUNTIME_ITEMS={form} (round {rnd})", fn, (q, k, v), do,
                   args.iters)
  work_items.RUNTIME_ITEMS = "auto"
  write_results(args.out, head)


if __name__ == "__main__":
  main()
