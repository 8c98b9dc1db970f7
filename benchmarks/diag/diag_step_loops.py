"""What a partial block costs the dK/dV kernel, and whether its loop structure is the cost:
`attention_bwd.STEP_LOOPS` "split" (per query head of the GQA group a loop of full steps and
one of partial steps), "tested" (per head one loop, every step tested), "one" (one loop over
the group's steps, every step tested), "one_cond" (one loop, the tests under a run-time
branch). The dK/dV kernel timed alone (dQ patched out) and both kernels, variants interleaved
over two rounds; the variants' gradients against "split"'s at full size.

    python -m benchmarks.diag.diag_step_loops --cases lm,lm_no_sinks,lm_causal,window --out x.json
"""
import math

import jax
import jax.numpy as jnp

from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq

from . import Rows, backward_inputs, case_parser, max_rel_diff

LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
# name: (batch, seq, mask, kv heads); H=16, D=128, bf16
CASES = {"lm": (2, 8192, LM, 4),
         "lm_no_sinks": (2, 8192, masks.causal() & masks.sliding_window(511), 4),
         "lm_causal": (2, 8192, masks.causal(), 4),
         "lm_mha": (2, 8192, LM, 16),
         "window": (1, 32768, masks.causal() & masks.sliding_window(2047), 16),
         "causal": (2, 16384, masks.causal(), 16)}
VARIANTS = ("split", "tested", "one", "one_cond")


def main():
  parser = case_parser("lm,lm_no_sinks,lm_causal,lm_mha,window")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rows = Rows()
  h, d = 16, 128
  variants = args.variants.split(",")
  for name in args.cases.split(","):
    b, s, mask, hkv = CASES[name]
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel")
    q, k, v, do, out, lse = backward_inputs(plan, b, s, h, hkv, d, cfg)
    d_lse = jnp.zeros_like(lse)
    scale = 1 / math.sqrt(d)
    no_dq = lambda q, *a, **kw: jnp.zeros((q.shape[0], lse.shape[-1], *q.shape[2:]), q.dtype)

    def compiled(variant, dq_too):
      """The backward traced with `variant` (and dQ patched out unless `dq_too`)."""
      saved = attention_bwd.STEP_LOOPS, attention_bwd_dq.dq
      try:
        attention_bwd.STEP_LOOPS = variant
        if not dq_too:
          attention_bwd_dq.dq = no_dq
        fn = jax.jit(lambda q, k, v, out, lse, do: attention_bwd.backward(
            q, k, v, None, None, out, lse, do, d_lse, plan, scale, cfg, False))
        grads = fn(q, k, v, out, lse, do)
        jax.block_until_ready(grads)
        return fn, grads
      finally:
        attention_bwd.STEP_LOOPS, attention_bwd_dq.dq = saved

    row = dict(case=name, blocks=int(plan.block_map.num_visited),
               partial=int(plan.block_map.num_visited - plan.block_map.num_full))
    fns, ref = {}, None
    for variant in variants:
      try:
        fns[f"dkv_{variant}"], _ = compiled(variant, False)
        fns[f"both_{variant}"], grads = compiled(variant, True)
      except Exception as e:  # noqa: BLE001 (a variant that does not compile is a result)
        row[f"{variant}_error"] = repr(e)[:300]
        continue
      if ref is None:
        ref = grads
      else:
        row[f"{variant}_rel_diff"] = round(max_rel_diff(grads, ref), 6)
    for rnd in range(args.rounds):
      for key, fn in fns.items():
        row[f"{key}_ms_{rnd}"] = round(time_ms(fn, q, k, v, out, lse, do, iters=10,
                                               repeats=5), 4)
    rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
