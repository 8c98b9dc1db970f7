"""The Hopper dK/dV kernel as persistent programs (`attention_bwd.PERSISTENT_DKV`: one program
per SM walking a static share of the work items) against one CTA per item: the backward
(both kernels) and the dK/dV kernel alone (dQ patched out), per mask, with the gradients of
the two forms compared; then neighborhood fwd+bwd end to end, the Triton backward against the
Hopper one, for `picks_mosaic`.

    python -m benchmarks.diag.diag_persistent_dkv --out persistent.json
"""
import argparse
import math

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq, attention_fwd

from . import Rows

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


def _with(flag, fn):
  """fn() with PERSISTENT_DKV set while it runs (and traces)."""
  saved = attention_bwd.PERSISTENT_DKV
  attention_bwd.PERSISTENT_DKV = flag
  try:
    return fn()
  finally:
    attention_bwd.PERSISTENT_DKV = saved


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--e2e", default=",".join(NA_E2E))
  parser.add_argument("--out", default=None)
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
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, do = (jax.random.normal(x, (b, n, H, D), jnp.bfloat16) for x in ks[:2])
    k, v = (jax.random.normal(x, (b, n, hkv, D), jnp.bfloat16) for x in ks[2:])
    try:
      out, lse = jax.jit(lambda q, k, v: attention_fwd.forward(
          q, k, v, None, None, plan, scale, cfg, False))(q, k, v)
    except Exception as e:  # noqa: BLE001 - a failed case is a row
      rows.record(case=name, error=repr(e)[:400])
      continue
    dlse = jnp.zeros_like(lse)
    no_dq = lambda q, *a, **kw: jnp.zeros((q.shape[0], lse.shape[-1], *q.shape[2:]), q.dtype)
    grads, row = {}, dict(case=name, blocks=int(plan.block_map.num_visited))
    for flag in (False, True):
      def both():
        f = jax.jit(lambda q, k, v, o, l, do, dl: attention_bwd.backward(
            q, k, v, None, None, o, l, do, dl, plan, scale, cfg, False))
        return time_ms(f, q, k, v, out, lse, do, dlse), f(q, k, v, out, lse, do, dlse)

      def dkv():
        saved = attention_bwd_dq.dq
        attention_bwd_dq.dq = no_dq
        try:
          f = jax.jit(lambda q, k, v, o, l, do, dl: attention_bwd.backward(
              q, k, v, None, None, o, l, do, dl, plan, scale, cfg, False))
          return time_ms(f, q, k, v, out, lse, do, dlse)
        finally:
          attention_bwd_dq.dq = saved
      key = "persistent" if flag else "per_item"
      try:
        row[f"{key}_ms"], grads[key] = _with(flag, both)
        row[f"{key}_dkv_ms"] = _with(flag, dkv)
      except Exception as e:  # noqa: BLE001
        row[f"{key}_error"] = repr(e)[:400]
    if len(grads) == 2:
      row["rel_diff"] = [_rel(a, b) for a, b in zip(grads["persistent"], grads["per_item"])]
      if isinstance(lay, SequenceLayout) and n <= 16384:  # XLA float32, one batch row
        ref = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"), q, k, v)[1](do))
        try:
          want = ref(*(x[:1].astype(jnp.float32) for x in (q, k, v, do)))
          row["rel_err_vs_xla"] = [_rel(g[:1], w) for g, w in zip(grads["persistent"], want)]
        except Exception as e:  # noqa: BLE001
          row["reference_error"] = repr(e)[:300]
    rows.record(**row)

  for name in filter(None, args.e2e.split(",")):
    b, spatial, kern, stride = NA_E2E[name]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(x, (b, *spatial, H, D), jnp.bfloat16) for x in ks)
    row, grads = dict(case=name, part="fwd+bwd"), {}
    for variant, cfgv, flag in (("triton", MosaicGPUConfig(backward="triton"), True),
                                ("mosaic_per_item", cfg, False),
                                ("mosaic_persistent", cfg, True)):
      loss = lambda q, k, v, c=cfgv: jnp.sum(
          jsa.na(q, k, v, kern, stride, backend="mosaic_gpu", config=c).astype(jnp.float32)
          * do.astype(jnp.float32))
      try:
        step = _with(flag, lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2))))
        row[f"{variant}_ms"] = _with(flag, lambda: time_ms(step, q, k, v))
        grads[variant] = _with(flag, lambda: step(q, k, v))
      except Exception as e:  # noqa: BLE001
        row[f"{variant}_error"] = repr(e)[:400]
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
