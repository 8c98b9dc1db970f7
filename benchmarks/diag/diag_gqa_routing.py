"""MoBA's S=32768 row at GQA 16/4 (pooled-score top 32 + 2 local of 256 blocks, selection
inside the timing) under the dK/dV work-item forms of runtime maps
(`work_items.RUNTIME_ITEMS`: "whole" lists, "chunks" with float32 reduce-adds, "auto"; with
`work_items.HEAD_ITEMS`: chunks per query head, "+head", per group "+group"; whole per-head
lists, "+headwhole"), the per-head and the group-shared
selection, beside MHA 16/16; gradients of each form against the first at the same inputs.

    python -m benchmarks.diag.diag_gqa_routing --forms auto,whole,chunks,auto+head --out gqa.json
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, routing
from pallas_kernels.gpu.mosaic_gpu import work_items

from ..bench_gpu import fwd_bwd, header, inputs, perf_row, record, rel_errors, write_results


def _set(form: str):
  """"auto", "whole", "chunks": `RUNTIME_ITEMS`; "+head": items per query head (`HEAD_ITEMS`),
  "+headwhole": the same with whole lists (`HEAD_CHUNK`); "+group": per group."""
  items, _, head = form.partition("+")
  work_items.RUNTIME_ITEMS = items
  work_items.HEAD_ITEMS = {"head": True, "headwhole": True, "group": False}.get(head, "auto")
  work_items.HEAD_CHUNK = "whole" if head == "headwhole" else "mean"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--seq", type=int, default=32768)
  parser.add_argument("--forms", default="auto,whole,chunks")
  parser.add_argument("--shared", action="store_true", help="also the group-shared selection")
  parser.add_argument("--mha", action="store_true", help="also MHA 16/16 (auto)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  head = header("bfloat16")
  record(**head)
  b, s, d, bs, top_k = 1, args.seq, 128, 128, 32
  configs = [(4, args.forms.split(","))] + ([(16, ["auto"])] if args.mha else [])
  for hkv, forms in configs:
    q, k, v, do = inputs((b, s, 16, d), (b, s, hkv, d), jnp.bfloat16)
    for shared in ((False, True) if hkv < 16 and args.shared else (False,)):
      fn = lambda q, k, v, sh=shared: jsa.attention(
          q, k, v, masks.causal(), block_selection=routing.topk_blocks(
              q, k, bs, top_k, causal=True, local_blocks=2, shared_by_group=sh))
      name = f"MoBA S={s} GQA 16/{hkv}, selection {'shared' if shared else 'per head'}"
      base = None
      for rnd in range(args.rounds):
        for form in forms:
          _set(form)
          if rnd == 0:
            got = fwd_bwd(fn)(q, k, v, do)
            base = got if base is None else base
            record(section="check", case=name, form=form,
                   **rel_errors(got, base))
          perf_row("perf", name, f"{form} (round {rnd})", fn, (q, k, v), do, args.iters)
  _set("auto")
  write_results(args.out, head)


if __name__ == "__main__":
  main()
