"""The Hopper backward's work order: the dK/dV kernel's items (`work_items.ITEM_ORDER`:
longest first or KV-block order; `SPLIT_OUTLIERS`: one item per KV block unless a list is an
outlier, so that dK/dV are stored, not reduce-added) and both kernels' grid order
(`work_items.ITEMS_FASTEST`, `attention_bwd_dq.Q_FASTEST`: Pallas runs the grid's last axis
fastest; batch there puts CTAs of every head side by side). Nsight Compute on 2-D NA k33
(`profile_dkv`) read a 19% L2 hit rate and 4.65 GB of DRAM reads for the dK/dV kernel with the
longest-first items, against 59% on dense. The backward (both kernels) per mask and variant,
gradients compared with the old default's ("longest"); then neighborhood fwd+bwd end to end
against the Triton backward. (The first call also ran "classes": a stable sort by 4 length
classes, within noise of "natural".)

    python -m benchmarks.diag.diag_dkv_items --out items.json
"""
import math

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq, work_items

from . import Rows, backward_inputs, case_parser

H, D = 16, 128
_LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
# name: (batch, mask, layout or sequence length, kv heads); neighborhoods in kernel order.
CASES = {
    "dense": (2, masks.full(), 16384, 16),
    "causal": (2, masks.causal(), 16384, 16),
    "window": (1, masks.causal() & masks.sliding_window(2047), 32768, 16),
    "lm": (2, _LM, 8192, 4),
    "na2d": (2, masks.neighborhood((128, 128), (33, 33)),
             TiledLayout((128, 128), (1, 1), (8, 16)), 16),
    "na2d_gqa4": (2, masks.neighborhood((128, 128), (33, 33)),
                  TiledLayout((128, 128), (1, 1), (8, 16)), 4),
    "na3d": (1, masks.neighborhood((16, 64, 64), (8, 16, 16)),
             TiledLayout((16, 64, 64), (1, 1, 1), (2, 8, 8)), 16),
}
NA_E2E = {"na2d": (2, (128, 128), (33, 33), (1, 1)),
          "na3d": (1, (16, 64, 64), (8, 16, 16), (1, 1, 1)),
          "strided": (1, (16, 64, 64), (8, 16, 16), (4, 8, 8))}


def _rel(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


# name: (ITEM_ORDER, SPLIT_OUTLIERS, ITEMS_FASTEST, attention_bwd_dq.Q_FASTEST). A third
# call also ran the dQ kernel's Q blocks last first (a knob since removed, 7ae9c81).
VARIANTS = {"longest": ("longest", False, False, False),
            "natural_split": ("natural", True, False, False),
            "natural_split_items_fastest": ("natural", True, True, False),
            "natural_split_both_fastest": ("natural", True, True, True)}
_KNOBS = ((work_items, "ITEM_ORDER"), (work_items, "SPLIT_OUTLIERS"),
          (work_items, "ITEMS_FASTEST"), (attention_bwd_dq, "Q_FASTEST"))


def _with(variant, fn):
  """fn() with the knobs of `variant` set while it runs (and traces)."""
  saved = [getattr(mod, name) for mod, name in _KNOBS]
  for (mod, name), value in zip(_KNOBS, VARIANTS[variant]):
    setattr(mod, name, value)
  try:
    return fn()
  finally:
    for (mod, name), value in zip(_KNOBS, saved):
      setattr(mod, name, value)


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--e2e", default=",".join(NA_E2E))
  args = parser.parse_args()
  rows = Rows()
  scale = 1 / math.sqrt(D)
  cfg = MosaicGPUConfig(backward="mosaic_gpu")
  for name in filter(None, args.cases.split(",")):
    b, mask, lay, hkv = CASES[name]
    if isinstance(lay, int):
      lay = SequenceLayout(lay, 128)
    plan = make_plan(mask, lay, lay)
    n = plan.q_layout.padded_len
    try:
      q, k, v, do, out, lse = backward_inputs(plan, b, n, H, hkv, D, cfg)
    except Exception as e:  # noqa: BLE001 - a failed case is a row
      rows.record(case=name, error=repr(e)[:400])
      continue
    dlse = jnp.zeros_like(lse)
    grads, row = {}, dict(case=name, blocks=int(plan.block_map.num_visited))
    for variant in args.variants.split(","):
      def both():
        f = jax.jit(lambda q, k, v, o, l, do, dl: attention_bwd.backward(
            q, k, v, None, None, o, l, do, dl, plan, scale, cfg, False))
        return time_ms(f, q, k, v, out, lse, do, dlse), f(q, k, v, out, lse, do, dlse)
      try:
        row[f"{variant}_ms"], grads[variant] = _with(variant, both)
      except Exception as e:  # noqa: BLE001
        row[f"{variant}_error"] = repr(e)[:400]
    if "longest" in grads:
      row["rel_diff_vs_longest"] = {key: [_rel(a, b) for a, b in zip(got, grads["longest"])]
                                    for key, got in grads.items() if key != "longest"}
      if isinstance(lay, SequenceLayout) and n <= 8192:  # XLA float32, one batch row
        ref = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"), q, k, v)[1](do))
        try:
          want = ref(*(x[:1].astype(jnp.float32) for x in (q, k, v, do)))
          row["rel_err_vs_xla"] = {key: [_rel(g[:1], w) for g, w in zip(got, want)]
                                   for key, got in grads.items()}
        except Exception as e:  # noqa: BLE001
          row["reference_error"] = repr(e)[:300]
    del grads
    rows.record(**row)

  for name in filter(None, args.e2e.split(",")):
    b, spatial, kern, stride = NA_E2E[name]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(x, (b, *spatial, H, D), jnp.bfloat16) for x in ks)
    row, grads = dict(case=name, part="fwd+bwd"), {}
    e2e_variants = [("triton", MosaicGPUConfig(backward="triton"), "natural_split")]
    e2e_variants += [(f"mosaic_{v}", cfg, v) for v in args.variants.split(",")]
    for label, cfgv, variant in e2e_variants:
      loss = lambda q, k, v, c=cfgv: jnp.sum(
          jsa.na(q, k, v, kern, stride, backend="mosaic_gpu", config=c).astype(jnp.float32)
          * do.astype(jnp.float32))
      try:
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        row[f"{label}_ms"] = _with(variant, lambda: time_ms(step, q, k, v))
        grads[label] = _with(variant, lambda: step(q, k, v))
      except Exception as e:  # noqa: BLE001
        row[f"{label}_error"] = repr(e)[:400]
    if grads:
      loss32 = lambda q, k, v: jnp.sum(jsa.na(q, k, v, kern, stride, backend="xla")
                                       * do.astype(jnp.float32))
      want = jax.jit(jax.grad(loss32, argnums=(0, 1, 2)))(*(x.astype(jnp.float32)
                                                              for x in (q, k, v)))
      row["rel_err_vs_xla"] = {key: [_rel(g, w) for g, w in zip(got, want)]
                               for key, got in grads.items()}
      del want, grads
    rows.record(**row)
  rows.write(args.out)


if __name__ == "__main__":
  main()
