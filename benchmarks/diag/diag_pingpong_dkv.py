"""The dK/dV kernel's warpgroups in ping-pong (`attention_bwd.PINGPONG_DKV`: a schedule barrier
alternates them, one's Pᵀ/dSᵀ while the other's matmuls run) where dQ is its own kernel,
against lockstep (the default). fwd and fwd+bwd ms, backend "mosaic_gpu", the variants
interleaved over two rounds; each case's gradients at a smaller size against float32 XLA,
and the two forms against each other at full size.

    python -m benchmarks.diag.diag_pingpong_dkv --out x.json [--cases lm,window,...]"""

from jax_sparse_attn import masks
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import knob_main, knob_setter
from .diag_union_terms import LM, run

# name: (mask, batch, seq, heads, kv heads, head_dim, documents)
CASES = {
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "lm_docs": (LM, 2, 8192, 16, 4, 128, 4),
    "lm_d64": (LM, 2, 8192, 8, 2, 64, 2),  # the models/ causal LM's attention
    "window": (masks.causal() & masks.sliding_window(2047), 1, 32768, 16, 16, 128, 0),
    "window_sinks": (masks.sliding_window(2047) | masks.sink(64), 1, 32768, 16, 16, 128, 0),
    "causal_d64": (masks.causal(), 2, 16384, 16, 16, 64, 0),
}


def main():
  knob_main(CASES, {"pingpong": True, "lockstep": False},
            knob_setter(attention_bwd, "PINGPONG_DKV"), run)


if __name__ == "__main__":
  main()
