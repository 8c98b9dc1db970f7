"""Where the Hopper backward's time goes with dQ as its own kernel: the dK/dV kernel alone
(2-4 Q/dO stages), both kernels (64- or 128-key S tiles in the dQ kernel; dK/dV stored in the
input dtype, `attention_bwd.DIRECT_DKV`), per mask, in one process.

    python -m benchmarks.diag.diag_backward_split --masks dense,causal,window --out x.json
    python -m benchmarks.diag.diag_backward_split --masks lm,lm_no_sinks,lm_causal  # LM layer
"""
import argparse
import json
import math

import jax
import jax.numpy as jnp

from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq, attention_fwd, policy

CASES = {"dense": (2, 16384, None, 16), "causal": (2, 16384, masks.causal(), 16),
         "window": (1, 32768, masks.causal() & masks.sliding_window(2047), 16),
         # The LM layer (GQA 16/4) and its mask without the sinks (a pure interval mask).
         "lm": (2, 8192, masks.causal() & (masks.sliding_window(511) | masks.sink(4)), 4),
         "lm_no_sinks": (2, 8192, masks.causal() & masks.sliding_window(511), 4),
         "lm_causal": (2, 8192, masks.causal(), 4)}
SWEEPS = ("dense", "causal", "window")  # the others: forward, both kernels, dK/dV alone


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--masks", default="dense,causal,window")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = []
  h, d = 16, 128
  for name in args.masks.split(","):
    b, s, mask, hkv = CASES[name]
    mask = mask or masks.full()
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, do = (jax.random.normal(x, (b, s, h, d), jnp.bfloat16) for x in ks[::3])
    k, v = (jax.random.normal(x, (b, s, hkv, d), jnp.bfloat16) for x in ks[1:3])
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    scale = 1 / math.sqrt(d)
    cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel")
    fwd = jax.jit(lambda q, k, v: attention_fwd.forward(q, k, v, None, None, plan, scale, cfg,
                                                        False))
    out, lse = fwd(q, k, v)
    d_lse = jnp.zeros_like(lse)

    def timed(**patch):
      """The backward's ms with module attributes patched while it traces (a new function
      each time, so that jit traces again)."""
      saved = {key: getattr(mod, attr) for key, (mod, attr, _) in patch.items()}
      try:
        for mod, attr, value in patch.values():
          setattr(mod, attr, value)
        bwd = lambda q, k, v, out, lse, do: attention_bwd.backward(
            q, k, v, None, None, out, lse, do, d_lse, plan, scale, cfg, False)
        return time_ms(jax.jit(bwd), q, k, v, out, lse, do, iters=10, repeats=5)
      except Exception as e:  # noqa: BLE001 (a variant that does not compile is a result)
        return repr(e)[:300]
      finally:
        for key, (mod, attr, _) in patch.items():
          setattr(mod, attr, saved[key])

    no_dq = lambda q, *a, **kw: jnp.zeros((q.shape[0], lse.shape[-1], *q.shape[2:]), q.dtype)
    row = dict(case=name, blocks=int(plan.block_map.num_visited),
               fwd_ms=time_ms(fwd, q, k, v, iters=10, repeats=5), both_ms=timed())
    if name not in SWEEPS:
      row["dkv_ms"] = timed(dq=(attention_bwd_dq, "dq", no_dq))
      print(json.dumps(row), flush=True)
      rows.append(row)
      continue
    for stages in (2, 3, 4):
      row[f"dkv_stages{stages}_ms"] = timed(dq=(attention_bwd_dq, "dq", no_dq),
                                            st=(policy, "STAGES", stages))
    for sub in (64, 128):
      row[f"both_sub{sub}_ms"] = timed(sub=(attention_bwd_dq, "KV_SUB", sub))
    row["both_direct_dkv_ms"] = timed(direct=(attention_bwd, "DIRECT_DKV", True))
    print(json.dumps(row), flush=True)
    rows.append(row)
  if args.out:
    json.dump({"device": str(jax.devices()[0]), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
