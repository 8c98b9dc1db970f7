"""Unions of interval masks on the Hopper kernels: intervals per term (`element.UNION_TERMS`,
an OR over terms of each term's merged dims) against the mask function on the kernel
positions (the form before). fwd and fwd+bwd ms, backend "mosaic_gpu", the variants
interleaved over two rounds; each case's gradients at a smaller size against float32 XLA, and
the two forms against each other at full size.

    python -m benchmarks.diag.diag_union_terms --out x.json [--cases lm,lm_docs,lm_d64,window]
"""

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.gpu.mosaic_gpu import element

from . import knob_main, knob_setter

LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
# name: (mask, batch, seq, heads, kv heads, head_dim, documents)
CASES = {
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "lm_docs": (LM, 2, 8192, 16, 4, 128, 4),
    "lm_d64": (LM, 2, 8192, 8, 2, 64, 2),  # the models/ causal LM's attention
    "window": (masks.causal() & masks.sliding_window(2047), 1, 32768, 16, 16, 128, 0),
    "sinks_only_window": (masks.sliding_window(2047) | masks.sink(64), 1, 32768, 16, 16, 128,
                          0),
}


def run(mask, seg):
  return lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg, backend="mosaic_gpu")


set_union = knob_setter(element, "UNION_TERMS")


def main():
  knob_main(CASES, {"union": True, "mask_fn": False}, set_union, run)


if __name__ == "__main__":
  main()
