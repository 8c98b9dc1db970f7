"""dK/dV of masks whose sink lists are cut into several work items: only the cut KV blocks'
items reduce-add into a float32 buffer of those blocks, the others store dK/dV in the input
dtype (`attention_bwd.MIXED_DKV`), against every item reduce-adding into float32 buffers of
the whole K/V (the form before). fwd and fwd+bwd ms, backend "mosaic_gpu", the variants
interleaved over two rounds; each case's gradients at a smaller size against float32 XLA, and
the two forms against each other at full size.

    python -m benchmarks.diag.diag_mixed_dkv --out x.json [--cases lm,lm_docs,lm_d64,...]
"""

import jax
import jax.numpy as jnp

from jax_sparse_attn import masks, ops
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import Rows, case_parser, interleaved, max_rel_diff
from ..bench_gpu import documents, fwd_bwd, inputs, rel
from .diag_union_terms import LM, run

# name: (mask, batch, seq, heads, kv heads, head_dim, documents)
CASES = {
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "lm_docs": (LM, 2, 8192, 16, 4, 128, 4),
    "lm_d64": (LM, 2, 8192, 8, 2, 64, 2),  # the models/ causal LM's attention
    "window_sinks": (masks.sliding_window(2047) | masks.sink(64), 1, 32768, 16, 16, 128, 0),
    # long lists: dQ fused into the dK/dV kernel (`attention_bwd.FUSED_MIN_ENTRIES`)
    "window8k_sinks": (masks.sliding_window(8191) | masks.sink(64), 1, 32768, 16, 16, 128, 0),
}


def set_mixed(on: bool):
  attention_bwd.MIXED_DKV = on
  ops._make_core.cache_clear()
  jax.clear_caches()


def main():
  parser = case_parser(",".join(CASES))
  args = parser.parse_args()
  rows = Rows()
  for name in args.cases.split(","):
    mask, b, s, h, hkv, d, docs = CASES[name]
    row = {"case": name, "batch": b, "seq": s, "heads": f"{h}/{hkv}", "head_dim": d,
           "documents": docs}
    sb, ss = 1, min(s, 4096)
    small = inputs((sb, ss, 4, d), (sb, ss, 4 * hkv // h, d), jnp.bfloat16, seed=1)
    seg_s = documents(sb, ss, docs) if docs else None
    f32 = [x.astype(jnp.float32) for x in small]
    want = fwd_bwd(lambda q, k, v: ops.attention(q, k, v, mask, segment_ids=seg_s,
                                                 backend="xla"))(*f32)
    set_mixed(True)
    got = fwd_bwd(run(mask, seg_s))(*small)
    row["rel_err_vs_xla_f32"] = {n: round(rel(g, w), 5)
                                 for n, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    big = inputs((b, s, h, d), (b, s, hkv, d), jnp.bfloat16)
    seg = documents(b, s, docs) if docs else None

    def variant(on):  # traced and compiled under each setting, then timed
      set_mixed(on)
      return run(mask, seg)

    grads = interleaved(row, {"mixed": lambda: variant(True),
                              "reduce_all": lambda: variant(False)}, big)
    row["mixed_vs_reduce_all_rel_diff"] = max_rel_diff(grads["mixed"], grads["reduce_all"])
    set_mixed(True)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
