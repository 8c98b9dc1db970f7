"""Where the Hopper forward's time goes on the LM layer (causal & (window 512 | 4 sinks), packed
documents, S=8192 B=2 H=16/4 D=128): the same kernel with and without documents, the static
map vs the runtime map of documents, the segment test on every block or on partial ones,
without the union (a pure interval mask), persistent or not, each element-test form
(`attention_fwd.TEST_FORM`); the Triton forward beside.

    python -m benchmarks.diag.diag_lm_forward --out x.json
"""
import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from jax_sparse_attn import block_map as block_map_lib
from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig, triton_attention
from pallas_kernels.gpu.mosaic_gpu import attention_fwd

from ..bench_gpu import documents
from ..bench_hopper_backward import LM_MASK

FORMS = (None, "each", "and")  # attention_fwd.TEST_FORM (None: the default rule)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  b, s, h, hkv, d = 2, 8192, 16, 4, 128
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (b, s, h, d), jnp.bfloat16)
  k, v = (jax.random.normal(x, (b, s, hkv, d), jnp.bfloat16) for x in ks[1:])
  scale = 1 / math.sqrt(d)
  seg, one = documents(b, s), jnp.zeros((b, s), jnp.int32)
  layout = SequenceLayout(s, 128)
  plans = {"lm": make_plan(LM_MASK, layout, layout),
           "window": make_plan(masks.causal() & masks.sliding_window(511), layout, layout)}
  maps = jax.jit(lambda x, p: block_map_lib.from_segments(x, x, p, h), static_argnums=1)
  cfg = MosaicGPUConfig()

  def mosaic(plan, q_seg, bmap=None, config=cfg):
    return lambda q, k, v: attention_fwd.forward(q, k, v, q_seg, q_seg, plan, scale, config,
                                                 False, **({"block_map": bmap} if bmap else {}))

  def triton(plan, q_seg, bmap=None):
    return lambda q, k, v: triton_attention.forward(
        q, k, v, q_seg, q_seg, plan, scale, None, False,
        **({"block_map": bmap} if bmap else {}))

  rows = {}
  for name, plan in plans.items():
    docs = maps(seg, plan.block_map)
    single = maps(one, plan.block_map)
    variants = {
        "no documents, static map": mosaic(plan, None),
        "documents, static map (test on every block)": mosaic(plan, seg),
        "documents, runtime map": mosaic(plan, seg, docs),
        "documents, runtime map, test on every block": mosaic(
            plan, seg, dataclasses.replace(docs, segments_full=False)),
        "documents, runtime map, one program per item": mosaic(
            plan, seg, docs, MosaicGPUConfig(persistent=False)),
        "one document, runtime map": mosaic(plan, one, single),
        "no documents, runtime map (no segment vectors)": mosaic(plan, None, single),
        "triton: no documents, static map": triton(plan, None),
        "triton: documents, runtime map": triton(plan, seg, docs),
    }
    for form in FORMS:
      for label, fn in variants.items():
        if label.startswith("triton") and form is not None:
          continue
        attention_fwd.TEST_FORM = form
        try:  # a new function each time: jit traces it again with the form
          ms = time_ms(jax.jit(lambda *a, f=fn: f(*a)), q, k, v, iters=20, repeats=5)
        except Exception as e:  # noqa: BLE001 (a variant that fails is a result)
          ms = repr(e)[:300]
        rows[f"{name}: {label} [{form}]"] = ms
        print(json.dumps({"mask": name, "variant": label, "form": form, "fwd_ms": ms}),
              flush=True)
  if args.out:
    json.dump({"device": str(jax.devices()[0]), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
