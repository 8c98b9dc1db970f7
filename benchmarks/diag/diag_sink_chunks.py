"""How a sink's Q list is cut into dK/dV work items: entries per item (the mean list length,
at least `MIN_CHUNK` = 8, when this was written; now `work_items.OUTLIER_CHUNK`: the mean)
and the items' order (`work_items.ITEM_ORDER`). Nsight Compute read the LM layer's dK/dV
kernel at 4.3 waves of CTAs, the sink's items (8 entries x 4 query heads: 64 steps) longer
than the others (~39): shorter sink items may fill the last wave better. Both backward
kernels timed, the variants interleaved over two rounds; gradients against the first
variant's.

    python -m benchmarks.diag.diag_sink_chunks --cases lm,lm_d64 --out x.json
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, policy, work_items

from . import Rows, backward_inputs, case_parser, max_rel_diff

LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
# name: (batch, seq, mask, heads, kv heads, head_dim)
CASES = {"lm": (2, 8192, LM, 16, 4, 128), "lm_d64": (2, 8192, LM, 8, 2, 64),
         "lm_mha": (2, 8192, LM, 16, 16, 128),
         "window_sinks": (1, 32768, masks.sliding_window(2047) | masks.sink(64), 16, 16, 128)}
# "chunk,order": every list longer than chunk cut (`SPLIT_OUTLIERS` off, `chunk_entries` fixed; "8"
# gives the LM layer the items it had before); "outlierN,order": only the outliers' lists
# (> 2x the mean) cut, into N entries.
VARIANTS = ("8,natural", "outlier8,natural", "outlier4,natural", "outlier6,natural",
            "outlier12,natural", "outlier16,natural", "outlier4,longest", "4,natural")


def outlier_items(chunk: int):
  """`work_items.static_items` with only the outliers' lists cut, into `chunk` entries."""
  def items(counts, order):
    counts = np.asarray(counts, np.int64)
    mean = counts[counts > 0].mean()
    out = [(j, s, min(chunk if n > 2 * mean else int(n), int(n) - s))
           for j, n in enumerate(counts)
           for s in range(0, int(n), chunk if n > 2 * mean else max(int(n), 1))]
    if order == "longest":
      out.sort(key=lambda it: -it[2])
    return np.asarray(out, np.int32)
  return items


def main():
  parser = case_parser("lm,lm_d64,lm_mha,window_sinks")
  parser.add_argument("--variants", default=None, help="chunk:order,... (default VARIANTS)")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rows = Rows()
  variants = ([v.split(":") for v in args.variants.split(",")] if args.variants else
              [v.split(",") for v in VARIANTS])
  for name in args.cases.split(","):
    b, s, mask, h, hkv, d = CASES[name]
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    cfg = MosaicGPUConfig(backward="mosaic_gpu")
    q, k, v, do, out, lse = backward_inputs(plan, b, s, h, hkv, d, cfg)
    d_lse = jnp.zeros_like(lse)
    scale = 1 / math.sqrt(d)
    row = dict(case=name, blocks=int(plan.block_map.num_visited),
               mean_entries=round(policy.mean_entries(plan.block_map), 2))
    fns, ref = {}, None
    for chunk, order in variants:
      key = f"chunk{chunk}_{order}"
      saved = (work_items.chunk_entries, work_items.ITEM_ORDER, work_items.static_items,
               work_items.SPLIT_OUTLIERS)
      try:
        if chunk.startswith("outlier"):
          make = outlier_items(int(chunk[len("outlier"):]))
          work_items.static_items = lambda counts, make=make, order=order: make(counts, order)
        else:
          work_items.chunk_entries = lambda mean, c=int(chunk): c
          work_items.SPLIT_OUTLIERS = False
        work_items.ITEM_ORDER = order
        items = work_items.static_items(np.asarray(plan.block_map.q_counts))
        row[f"{key}_items"] = int(len(items))
        fn = jax.jit(lambda q, k, v, out, lse, do: attention_bwd.backward(
            q, k, v, None, None, out, lse, do, d_lse, plan, scale, cfg, False))
        grads = fn(q, k, v, out, lse, do)
        jax.block_until_ready(grads)
      except Exception as e:  # noqa: BLE001 (a variant that does not compile is a result)
        row[f"{key}_error"] = repr(e)[:300]
        continue
      finally:
        (work_items.chunk_entries, work_items.ITEM_ORDER, work_items.static_items,
         work_items.SPLIT_OUTLIERS) = saved
      fns[key] = fn
      if ref is None:
        ref = grads
      else:
        row[f"{key}_rel_diff"] = round(max_rel_diff(grads, ref), 6)
    for rnd in range(args.rounds):
      for key, fn in fns.items():
        row[f"{key}_ms_{rnd}"] = round(time_ms(fn, q, k, v, out, lse, do, iters=10,
                                               repeats=5), 4)
    rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
