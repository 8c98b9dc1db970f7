"""The Hopper backward's dK/dV work items on runtime (content-routed) maps: lists cut into
chunks of the mean length (float32 reduce-adds into zero-filled dK/dV, then a cast) against
one item per KV block with its whole lists (dK/dV stored in bf16), `work_items.RUNTIME_ITEMS`.
Forward and fwd+bwd ms interleaved, the variants' gradients against each other, and "whole"
against the float32 XLA backend at S=4096.

With ``--written``: whole lists whose items store zeros for blocks no query visits, dK/dV
the kernel's outputs (`WRITTEN_RUNTIME`) against zero-filled dK/dV buffers, and the same with
dQ as its own kernel (no float32 dQ buffer to fill and cast; `FUSED_MIN_ENTRIES` raised).

    python -m benchmarks.diag.diag_runtime_items [--cases moba,eighth] [--written] [--out x.json]
"""
import json
import sys

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, ops, routing
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, policy, work_items

from . import interleaved, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs, rel_errors


def moba(top_k, local=2, fraction=None):
  def run(q, k, v, backend="auto"):
    if fraction is None:
      sel = routing.topk_blocks(q, k, 128, top_k, causal=True, local_blocks=local)
    else:  # the top `fraction` of each row's visible blocks by pooled scores, and its own
      nb = q.shape[1] // 128
      scores = routing.pooled_scores(q, k, 128)
      sel = routing.select(scores, 128, nb // 8, causal=True, local_blocks=1,
                           top_fraction=fraction)
    return jsa.attention(q, k, v, masks.causal(), block_selection=sel, backend=backend)
  return run


# name: (q shape, kv shape, fn)
CASES = {
    "moba": ((1, 32768, 16, 128), (1, 32768, 16, 128), moba(32)),
    "moba_gqa": ((1, 32768, 16, 128), (1, 32768, 4, 128), moba(32)),
    "moba_4096": ((2, 4096, 16, 128), (2, 4096, 16, 128), moba(8)),
    "eighth": ((1, 32768, 16, 128), (1, 32768, 16, 128), moba(None, fraction=0.125)),
}


_FUSED_MIN = policy.FUSED_MIN_ENTRIES


def _set(value, written=True, dq_kernel=False):
  work_items.RUNTIME_ITEMS = value
  attention_bwd.WRITTEN_RUNTIME = written
  policy.FUSED_MIN_ENTRIES = 1 << 30 if dq_kernel else _FUSED_MIN
  ops._make_core.cache_clear()
  jax.clear_caches()


def main():
  out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
  rows = []
  small = inputs((1, 4096, 8, 128), (1, 4096, 4, 128), jnp.bfloat16, seed=1)
  f32 = [x.astype(jnp.float32) for x in small]
  fn = moba(8)
  want = fwd_bwd(lambda q, k, v: fn(q, k, v, "xla"))(*f32)
  _set("whole")
  got = fwd_bwd(fn)(*small)
  row = {"check": "MoBA S=4096 top 8, GQA 8/4, whole lists vs xla f32",
         "rel_err": rel_errors(got, want, digits=5)}
  print(json.dumps(row), flush=True)
  rows.append(row)
  names = (sys.argv[sys.argv.index("--cases") + 1].split(",") if "--cases" in sys.argv
           else list(CASES))
  for name in names:
    qs, ks, fn = CASES[name]
    big = inputs(qs, ks, jnp.bfloat16)
    row = {"case": name, "q": qs, "kv": ks}
    _set("auto")
    if "--written" in sys.argv:
      variants = {v: (lambda v=v: (_set("whole", v != "filled", v == "written_dq_kernel"),
                                   fn)[1])
                  for v in ("written", "filled", "written_dq_kernel")}
      grads = interleaved(row, variants, big)
      row["written_vs_filled_rel_diff"] = max_rel_diff(grads["written"], grads["filled"])
      row["dq_kernel_vs_filled_rel_diff"] = max_rel_diff(grads["written_dq_kernel"],
                                                         grads["filled"])
    else:
      variants = {v: (lambda v=v: (_set(v), fn)[1]) for v in ("chunks", "whole")}
      grads = interleaved(row, variants, big)
      row["whole_vs_chunks_rel_diff"] = max_rel_diff(grads["whole"], grads["chunks"])
    print(json.dumps(row), flush=True)
    rows.append(row)
  _set("auto")
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}
  if out:
    json.dump(result, open(out, "w"), indent=1)


if __name__ == "__main__":
  main()
