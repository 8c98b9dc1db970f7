"""The dK/dV kernel skipping partial steps whose 64 queries none of a warpgroup's 64 keys may
see (`policy.QUARTERS`, `tables.live_quarters`), and the dQ kernel skipping the 64-key
halves none of a warpgroup's 64 queries may see too (`QUARTERS_DQ`), against every step run. fwd and
fwd+bwd ms, backend "mosaic_gpu", the variants interleaved over two rounds (the fixed harness: each
timing jitted under its own knob); each case's gradients at a smaller size against float32
XLA, and the two forms against each other at full size.

    python -m benchmarks.diag.diag_quarters --out x.json [--cases lm,lm_d64,window]"""

from jax_sparse_attn import masks
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, policy

from . import knob_main, knob_setter

_QUARTERS = knob_setter(policy, "QUARTERS")
from .diag_union_terms import LM, run

# name: (mask, batch, seq, heads, kv heads, head_dim, documents); no documents: their
# runtime map keeps every step.
CASES = {
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "lm_d64": (LM, 2, 8192, 8, 2, 64, 0),
    "window": (masks.causal() & masks.sliding_window(2047), 1, 32768, 16, 16, 128, 0),
}


def _set(value):
  """(QUARTERS, QUARTERS_DQ)."""
  attention_bwd.QUARTERS_DQ = value[1]
  _QUARTERS(value[0])


def main():
  knob_main(CASES, {"both": (True, True), "dkv": (True, False), "all": (False, False)},
            _set, run)


if __name__ == "__main__":
  main()
