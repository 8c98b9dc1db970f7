"""S and dP with query rows in the Hopper dK/dV kernel (`attention_bwd.QUERY_ROWS`), as
FlashAttention-3's backward at head_dim 128: per variant (fused dQ / two kernels, each
transposed or with query rows; register budgets) ptxas' register and spill report, gradients
against float32 XLA, the backward alone on dense, causal, the causal window and the LM
layer's mask, and MoBA fwd+bwd; cuDNN's forward and fwd+bwd beside them. Each variant runs in
its own process (ptxas reports to that process' stdout: `MOSAIC_GPU_DUMP_PTXAS=1`).

    python -m benchmarks.diag.diag_query_rows --out DIR [--variants a,b] [--cases a,b]

The query-rows form is at commit e8ac0e6 (removed after its measurement); at later commits
the `_q` variants run as their `_t` base.
"""
import json
import math
import os

from . import child_done, run_variant, variant_parser

# name: (backward_dq, QUERY_ROWS, registers of the compute / memory warpgroups or None)
VARIANTS = {
    "fused_t": ("split", (), None),
    "fused_q": ("split", ("fused",), None),
    "fused_q_232": ("split", ("fused",), (232, 40)),
    "two_t": ("kernel", (), None),
    "two_q": ("kernel", ("dkv",), None),
    "cudnn": None,
}
CASES = ("dense", "causal", "window", "lm", "moba")


def _cases(d):
  from jax_sparse_attn import masks
  return {"dense": (2, 16384, masks.full(), 16),
          "causal": (2, 16384, masks.causal(), 16),
          "window": (1, 32768, masks.causal() & masks.sliding_window(2048), 16),
          "lm": (2, 8192, masks.causal() & (masks.sliding_window(511) | masks.sink(4)), 4)}


def child(name: str, out_path: str, cases):
  import jax
  import jax.numpy as jnp

  import jax_sparse_attn as jsa
  from jax_sparse_attn import masks
  from jax_sparse_attn.demo import time_ms
  from jax_sparse_attn.layout import SequenceLayout
  from jax_sparse_attn.plan import make_plan
  from pallas_kernels.gpu import MosaicGPUConfig
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, policy
  from . import backward_inputs
  from ..bench_gpu import fwd_bwd, inputs
  from ..cli import suites

  row = {"variant": name}
  d, h = 128, 16
  if VARIANTS[name] is None:  # cuDNN
    for label in cases:
      if label not in ("dense", "causal"):
        continue
      b, s, _, _ = _cases(d)[label]
      q, k, v, do = inputs((b, s, h, d), (b, s, h, d), jnp.bfloat16)
      f = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=label == "causal", implementation="cudnn")
      row[f"{label}_fwd_ms"] = time_ms(jax.jit(f), q, k, v, iters=10, repeats=7)
      row[f"{label}_fwd_bwd_ms"] = time_ms(fwd_bwd(f), q, k, v, do, iters=10, repeats=7)
      row[f"{label}_bwd_ms"] = row[f"{label}_fwd_bwd_ms"] - row[f"{label}_fwd_ms"]
    child_done(row, out_path)
  dq_form, query_rows, regs = VARIANTS[name]
  attention_bwd.QUERY_ROWS = query_rows
  if regs:
    setattr(attention_bwd, "FUSED_REGISTERS" if dq_form == "split" else "REGISTERS", regs)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq_form)
  # Gradients against float32 XLA: dense, a causal window, and GQA with segment ids.
  b, s, hq, hkv = 1, 2048, 4, 2
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q, do = (jax.random.normal(x, (b, s, hq, d), jnp.bfloat16) for x in ks[::3])
  k, v = (jax.random.normal(x, (b, s, hkv, d), jnp.bfloat16) for x in ks[1:3])
  seg = jnp.repeat(jnp.arange(4), s // 4)[None]
  errs = {}
  for label, mask, segs in (("dense", masks.full(), None),
                            ("causal_window", masks.causal() & masks.sliding_window(700), None),
                            ("causal_segments", masks.causal(), seg)):
    def loss(q, k, v, backend, mask=mask, segs=segs):
      kw = dict(backend=backend, config=cfg) if backend == "mosaic_gpu" else dict(backend=backend)
      o = jsa.attention(q, k, v, mask, segment_ids=segs, **kw)
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    got = jax.jit(jax.grad(lambda *a: loss(*a, "mosaic_gpu"), argnums=(0, 1, 2)))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(jax.grad(lambda *a: loss(*a, "xla"), argnums=(0, 1, 2)))(*f32)
    errs[label] = [round(float(jnp.linalg.norm(g.astype(jnp.float32) - w)
                               / jnp.linalg.norm(w)), 5) for g, w in zip(got, want)]
  row["rel_err"] = errs
  print(json.dumps(row), flush=True)
  for label in cases:
    if label == "moba":
      case = suites(quick=False)["routing"]()[0]
      q, k, v, do = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
      # The CLI's case takes the default config: the form through FUSED_MIN_ENTRIES.
      policy.FUSED_MIN_ENTRIES = 0 if dq_form == "split" else 10 ** 9
      step = fwd_bwd(lambda q, k, v: case.run(q, k, v, "mosaic_gpu"))
      row["moba_fwd_bwd_ms"] = time_ms(step, q, k, v, do, iters=5, repeats=5)
      continue
    b, s, mask, hkv = _cases(d)[label]
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    q, k, v, do, out, lse = backward_inputs(plan, b, s, h, hkv, d, cfg)
    scale = 1 / math.sqrt(d)
    d_lse = jnp.zeros_like(lse)
    bwd = jax.jit(lambda q, k, v, out, lse, do: attention_bwd.backward(
        q, k, v, None, None, out, lse, do, d_lse, plan, scale, cfg, False))
    row[f"{label}_bwd_ms"] = time_ms(bwd, q, k, v, out, lse, do, iters=10, repeats=7)
    print(json.dumps(row), flush=True)
  row["device"] = str(jax.devices()[0].device_kind)
  child_done(row, out_path)


def main():
  parser = variant_parser(VARIANTS)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--timeout", type=int, default=150)
  args = parser.parse_args()
  cases = args.cases.split(",")
  if args.child:
    return child(args.child, os.path.join(args.out, f"{args.child}.json"), cases)
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.variants.split(","):
    rows.append(run_variant("benchmarks.diag.diag_query_rows", name, args.out,
                            args=("--cases", args.cases), timeout=args.timeout))
    print(json.dumps(rows[-1]), flush=True)
    json.dump({"variants": {k: v for k, v in VARIANTS.items()}, "rows": rows},
              open(os.path.join(args.out, "summary.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
