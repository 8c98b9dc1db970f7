"""dK/dV of masks whose sink lists are cut into several work items: only the cut KV blocks'
items reduce-add into a float32 buffer of those blocks, the others store dK/dV in the input
dtype (`attention_bwd.MIXED_DKV`), against every item reduce-adding into float32 buffers of
the whole K/V (the form before). fwd and fwd+bwd ms, backend "mosaic_gpu", the variants
interleaved over two rounds; each case's gradients at a smaller size against float32 XLA, and
the two forms against each other at full size.

    python -m benchmarks.diag.diag_mixed_dkv --out x.json [--cases lm,lm_docs,lm_d64,...]
"""

from jax_sparse_attn import masks
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import knob_main, knob_setter
from .diag_union_terms import LM, run

# name: (mask, batch, seq, heads, kv heads, head_dim, documents)
CASES = {
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "lm_docs": (LM, 2, 8192, 16, 4, 128, 4),
    "lm_d64": (LM, 2, 8192, 8, 2, 64, 2),  # the models/ causal LM's attention
    "window_sinks": (masks.sliding_window(2047) | masks.sink(64), 1, 32768, 16, 16, 128, 0),
    # long lists: dQ fused into the dK/dV kernel (`policy.FUSED_MIN_ENTRIES`)
    "window8k_sinks": (masks.sliding_window(8191) | masks.sink(64), 1, 32768, 16, 16, 128, 0),
}


def main():
  knob_main(CASES, {"mixed": True, "reduce_all": False},
            knob_setter(attention_bwd, "MIXED_DKV"), run)


if __name__ == "__main__":
  main()
