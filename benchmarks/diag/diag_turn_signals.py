"""How the forward's two compute warpgroups take turns (`attention_fwd.TURN_SIGNALS`): one
shared barrier both meet at after each QKᵀ issue and before each P·V, against a signal per
warpgroup (FlashAttention-3's order: signal the other after the QKᵀ issue, wait only before
the P·V). fwd and fwd+bwd ms, backend "mosaic_gpu", the variants interleaved over two rounds
(each timing jitted under its own knob); each case's output and gradients at a smaller size
against float32 XLA, and the two forms against each other at full size.

    python -m benchmarks.diag.diag_turn_signals --out x.json [--cases dense,causal,...]"""

from jax_sparse_attn import masks
from pallas_kernels.gpu.mosaic_gpu import attention_fwd

from . import knob_main, knob_setter
from .diag_union_terms import LM, run

# name: (mask, batch, seq, heads, kv heads, head_dim, documents)
CASES = {
    "dense": (masks.full(), 2, 16384, 16, 16, 128, 0),
    "causal": (masks.causal(), 2, 16384, 16, 16, 128, 0),
    "window": (masks.causal() & masks.sliding_window(2047), 1, 32768, 16, 16, 128, 0),
    # 2-D NA k33 at 64² (B=8: the headline's tokens; the small check needs <= 4096 tokens)
    "na2d": (masks.neighborhood((64, 64), 33), 8, 4096, 16, 16, 128, 0),
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "dense_d64": (masks.full(), 2, 16384, 16, 16, 64, 0),
}


def main():
  knob_main(CASES, {"shared": False, "signals": True},
            knob_setter(attention_fwd, "TURN_SIGNALS"), run)


if __name__ == "__main__":
  main()
