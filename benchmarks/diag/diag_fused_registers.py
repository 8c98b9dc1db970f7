"""The Hopper backward's register plan: per variant of the register budgets in
`attention_bwd` (REGISTERS for the two-kernel form, FUSED_REGISTERS for the fused one), the
form (the fused form's Pᵀ through shared memory, `P_SMEM`, measured 2026-12-06 at commit
a542e24: docs/experiments/h100-2026-12-06-fused-registers.json; the accumulators' initial
values, `LSE_IN_ACC`, and dQ a step late, `DEFERRED_DQ`, 2026-12-07), ptxas' register and spill
report, a gradient check against a float32 reference and the backward's ms on dense, causal
and the LM layer's mask. (The variants of
2026-12-03, coordinate vectors and the dQ accumulator's form, are at commit 69822f7,
docs/experiments/h200-2026-12-03-fused-registers.json.) Each variant runs in its own process
(ptxas' report goes to that process' stdout: `MOSAIC_GPU_DUMP_PTXAS=1`; SASS with `--sass`).

    python -m benchmarks.diag.diag_fused_registers --out DIR [--variants a,b] [--sass a,b]
"""
import json
import math
import os

from . import child_done, run_variant, variant_parser

# name: (backward_dq, registers of the compute / memory warpgroups[, attention_bwd switches])
VARIANTS = {
    "two": ("kernel", (232, 40)),
    "fused": ("split", (240, 24)),
    "fused_232": ("split", (232, 40)),
    "fused_lse": ("split", (240, 24), {"LSE_IN_ACC": True}),
    "fused_lse_232": ("split", (232, 40), {"LSE_IN_ACC": True}),
    "two_lse": ("kernel", (232, 40), {"LSE_IN_ACC": True}),
    "fused_deferred": ("split", (240, 24), {"DEFERRED_DQ": True}),
    "fused_deferred_lse": ("split", (240, 24), {"DEFERRED_DQ": True, "LSE_IN_ACC": True}),
    "fused_deferred_pp": ("split", (240, 24), {"DEFERRED_DQ": "pingpong"}),
}
CASES = ("dense", "causal", "lm")


def child(name: str, out_path: str):
  import jax
  import jax.numpy as jnp

  import jax_sparse_attn as jsa
  from jax_sparse_attn import masks
  from jax_sparse_attn.demo import time_ms
  from jax_sparse_attn.layout import SequenceLayout
  from jax_sparse_attn.plan import make_plan
  from pallas_kernels.gpu import MosaicGPUConfig
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_fwd

  dq_form, regs, *switches = VARIANTS[name]
  setattr(attention_bwd, "FUSED_REGISTERS" if dq_form == "split" else "REGISTERS", regs)
  for key, value in (switches[0] if switches else {}).items():
    setattr(attention_bwd, key, value)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq_form)
  row = {"variant": name}
  # Gradients against float32 XLA attention: causal & window with documents-free GQA.
  b, s, h, hkv, d = 1, 2048, 4, 2, 128
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q, do = (jax.random.normal(x, (b, s, h, d), jnp.bfloat16) for x in ks[::3])
  k, v = (jax.random.normal(x, (b, s, hkv, d), jnp.bfloat16) for x in ks[1:3])
  errs = {}
  for label, mask in (("dense", masks.full()), ("causal_window", masks.causal()
                                                & masks.sliding_window(700))):
    def loss(q, k, v, backend, mask=mask):
      kw = dict(backend=backend, config=cfg) if backend == "mosaic_gpu" else dict(backend=backend)
      o = jsa.attention(q, k, v, mask, **kw)
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    got = jax.jit(jax.grad(lambda *a: loss(*a, "mosaic_gpu"), argnums=(0, 1, 2)))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(jax.grad(lambda *a: loss(*a, "xla"), argnums=(0, 1, 2)))(*f32)
    errs[label] = [float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
                   for g, w in zip(got, want)]
  row["rel_err"] = errs
  cases = {"dense": (2, 16384, masks.full(), 16),
           "causal": (2, 16384, masks.causal(), 16),
           "lm": (2, 8192, masks.causal() & (masks.sliding_window(511) | masks.sink(4)), 4)}
  h = 16
  for label in CASES:
    b, s, mask, hkv = cases[label]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, do = (jax.random.normal(x, (b, s, h, d), jnp.bfloat16) for x in ks[::3])
    k, v = (jax.random.normal(x, (b, s, hkv, d), jnp.bfloat16) for x in ks[1:3])
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    scale = 1 / math.sqrt(d)
    out, lse = jax.jit(lambda q, k, v: attention_fwd.forward(
        q, k, v, None, None, plan, scale, cfg, False))(q, k, v)
    d_lse = jnp.zeros_like(lse)
    bwd = jax.jit(lambda q, k, v, out, lse, do: attention_bwd.backward(
        q, k, v, None, None, out, lse, do, d_lse, plan, scale, cfg, False))
    row[f"{label}_ms"] = time_ms(bwd, q, k, v, out, lse, do, iters=10, repeats=7)
  row["device"] = str(jax.devices()[0].device_kind)
  child_done(row, out_path)


def main():
  parser = variant_parser(VARIANTS)
  parser.add_argument("--sass", default="")
  parser.add_argument("--child-timeout", type=float, default=400)
  args = parser.parse_args()
  if args.child:
    return child(args.child, os.path.join(args.out, f"{args.child}.json"))
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.variants.split(","):
    sass = {"MOSAIC_GPU_DUMP_SASS": "1"} if name in args.sass.split(",") else None
    rows.append(run_variant("benchmarks.diag.diag_fused_registers", name, args.out, env=sass,
                            timeout=args.child_timeout))
    print(json.dumps(rows[-1]), flush=True)
  json.dump({"variants": VARIANTS, "rows": rows}, open(os.path.join(args.out, "summary.json"),
                                                       "w"), indent=1)


if __name__ == "__main__":
  main()
