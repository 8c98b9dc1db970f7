"""The neighborhood backward on Hopper: the Mosaic GPU kernels with the forward's MMA bias on
partial blocks (`tables.backward_mma_inputs`) against the same kernels with the element test
and against the Triton backward (the default), end to end (the Hopper forward in every
variant); then the Mosaic GPU backward alone, with and without its permutation into kernel
order, and its dQ kernel alone. Gradients checked against the float32 XLA backend at the same
sizes.

    python -m benchmarks.diag.diag_na_backward --out na_backward.json
    python -m benchmarks.diag.diag_na_backward --cases na2d --check 0 --probe 1  # dK/dV probe
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import gathered, make_plan
from jax_sparse_attn.simulate import best_tile_shapes
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq, attention_fwd
from pallas_kernels.gpu.mosaic_gpu.boxes import kernel_order

from . import Rows, backward_inputs, case_parser

# name: (batch, spatial, kernel, stride)
CASES = {"na2d": (2, (128, 128), (33, 33), (1, 1)),
         "na3d": (1, (16, 64, 64), (8, 16, 16), (1, 1, 1)),
         "strided": (1, (16, 64, 64), (8, 16, 16), (4, 8, 8))}
VARIANTS = {"triton": MosaicGPUConfig(),
            "mosaic_element": MosaicGPUConfig(backward="mosaic_gpu"),
            "mosaic_mma": MosaicGPUConfig(backward="mosaic_gpu")}


def _rel(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def main():
  parser = case_parser("na2d,strided,na3d")
  parser.add_argument("--check", type=int, default=1)
  parser.add_argument("--probe", type=int, default=0)
  args = parser.parse_args()
  rows = Rows()
  h, d = 16, 128
  mma_inputs = attention_bwd.backward_mma_inputs
  for name in filter(None, args.cases.split(",")):
    b, spatial, kern, stride = CASES[name]
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(x, (b, *spatial, h, d), jnp.bfloat16) for x in ks)
    fwd = jax.jit(lambda q, k, v: jsa.na(q, k, v, kern, stride, backend="mosaic_gpu"))
    ms_fwd = time_ms(fwd, q, k, v)
    rows.record(case=name, part="forward", ms=ms_fwd)
    grads = {}
    for variant, cfg in VARIANTS.items():
      # A new function per variant: the patched table builder is read while tracing.
      attention_bwd.backward_mma_inputs = (
          (lambda *a: None) if variant == "mosaic_element" else mma_inputs)
      loss = lambda q, k, v, cfg=cfg: jnp.sum(
          jsa.na(q, k, v, kern, stride, backend="mosaic_gpu", config=cfg).astype(jnp.float32)
          * do.astype(jnp.float32))
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        ms = time_ms(step, q, k, v)
        grads[variant] = step(q, k, v)
        rows.record(case=name, part="fwd+bwd", variant=variant, ms=ms, bwd_ms=ms - ms_fwd)
      except Exception as e:  # noqa: BLE001 - a failed variant is a row, not the end
        rows.record(case=name, part="fwd+bwd", variant=variant, error=repr(e)[:400])
    attention_bwd.backward_mma_inputs = mma_inputs
    if args.check:
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      loss32 = lambda q, k, v: jnp.sum(jsa.na(q, k, v, kern, stride, backend="xla")
                                       * do.astype(jnp.float32))
      try:
        want = jax.jit(jax.grad(loss32, argnums=(0, 1, 2)))(*f32)
        for variant, got in grads.items():
          rows.record(case=name, part="check vs xla float32", variant=variant,
                      rel_err=[_rel(g, w) for g, w in zip(got, want)])
      except Exception as e:  # noqa: BLE001
        rows.record(case=name, part="check", error=repr(e)[:400])
      del want

    # The Mosaic GPU backward alone on its plan (128-token blocks, the tiles ops picks).
    mask = masks.neighborhood(spatial, kern, stride)
    ones = (1,) * len(spatial)
    tq, tk = best_tile_shapes(mask, 128, 128)
    plan = gathered(make_plan(mask, TiledLayout(spatial, ones, tuple(tq)),
                              TiledLayout(spatial, ones, tuple(tk))))
    kplan = gathered(plan, False)
    scale = 1 / math.sqrt(d)
    cfg = MosaicGPUConfig(backward="mosaic_gpu")
    n = math.prod(spatial)
    flat = lambda x: x.reshape(b, n, h, d)
    qf, kf, vf, dof = (flat(x) for x in (q, k, v, do))
    out, lse = jax.jit(lambda q, k, v: attention_fwd.forward(q, k, v, None, None, plan, scale,
                                                             cfg, False))(qf, kf, vf)
    dlse = jnp.zeros_like(lse)
    ql, kl = plan.q_layout, plan.kv_layout
    korder = lambda x, l: kernel_order(x, l)
    rows_k = lambda x: kernel_order(x.transpose(0, 2, 1), ql).transpose(0, 2, 1)
    kargs = (korder(qf, ql), korder(kf, kl), korder(vf, kl), korder(out, ql), rows_k(lse),
             korder(dof, ql), rows_k(dlse))
    for variant in ("mosaic_element", "mosaic_mma"):
      attention_bwd.backward_mma_inputs = (
          (lambda *a: None) if variant == "mosaic_element" else mma_inputs)
      whole = jax.jit(lambda q, k, v, o, l, do, dl: attention_bwd.backward(
          q, k, v, None, None, o, l, do, dl, plan, scale, cfg, False))
      kernels = jax.jit(lambda q, k, v, o, l, do, dl: attention_bwd.backward(
          q, k, v, None, None, o, l, do, dl, kplan, scale, cfg, False))
      try:
        rows.record(case=name, part="backward alone", variant=variant, tiles=[tq, tk],
                    ms_with_permutation=time_ms(whole, qf, kf, vf, out, lse, dof, dlse),
                    ms_kernel_order=time_ms(kernels, *kargs))
      except Exception as e:  # noqa: BLE001
        rows.record(case=name, part="backward alone", variant=variant, error=repr(e)[:400])
    attention_bwd.backward_mma_inputs = mma_inputs
    # The dQ kernel alone (kernel order), with the bias.
    try:
      from pallas_kernels.gpu.mosaic_gpu.tables import backward_mma_inputs
      mma = backward_mma_inputs(kplan, scale)
      lo, hi, c = (jnp.asarray(x, jnp.int32) for x in (kplan.q_lo, kplan.q_hi, kplan.kv_c))
      lse2 = kargs[4] * math.log2(math.e)
      delta = jnp.zeros_like(lse2)
      dq_fn = jax.jit(lambda q, k, v, do, l2, dl: attention_bwd_dq.dq(
          q, k, v, do, l2, dl, lo, hi, c, [], bmap=kplan.block_map, scale=scale, mask_fn=None,
          interpret=False, mma=None if mma is None else mma[0]))
      rows.record(case=name, part="dq kernel alone", variant="mosaic_mma",
                  ms=time_ms(dq_fn, kargs[0], kargs[1], kargs[2], kargs[5], lse2, delta),
                  blocks=int(kplan.block_map.kv_counts.sum()),
                  partial=int((kplan.block_map.kv_counts - kplan.block_map.kv_full_counts).sum()))
    except Exception as e:  # noqa: BLE001
      rows.record(case=name, part="dq kernel alone", error=repr(e)[:400])
  if args.probe:
    _probe(rows)
  rows.write(args.out)


def _probe(rows):
  """Where the dK/dV kernel's time goes on 2-D NA 128² k33 (kernel order, the MMA bias): the
  backward and its dQ kernel alone as mapped, with every block run as full (no mask work:
  wrong gradients, the time without masks), with GQA (longer Q lists per CTA: each KV head's
  CTA walks every query head of its group), and dense S=16384 for the per-block cost."""
  import numpy as np
  b, h, d = 2, 16, 128
  scale = 1 / math.sqrt(d)
  cfg = MosaicGPUConfig(backward="mosaic_gpu")
  spatial, kern = (128, 128), (33, 33)
  mask = masks.neighborhood(spatial, kern)
  lay = TiledLayout(spatial, (1, 1), (8, 16))
  kplan = make_plan(mask, lay, lay)
  bm = kplan.block_map
  nomask = dataclasses.replace(kplan, block_map=dataclasses.replace(
      bm, q_full_counts=np.asarray(bm.q_counts), kv_full_counts=np.asarray(bm.kv_counts)))
  dense = make_plan(masks.full(), SequenceLayout(16384, 128), SequenceLayout(16384, 128))
  n = 16384
  for label, plan, hkv in (("na2d", kplan, 16), ("na2d all blocks full", nomask, 16),
                           ("na2d GQA 16/4", kplan, 4), ("na2d GQA 16/1", kplan, 1),
                           ("dense S=16384", dense, 16)):
    try:
      q, k, v, do, out, lse = backward_inputs(plan, b, n, h, hkv, d, cfg, seed=1)
      dlse = jnp.zeros_like(lse)
      whole = jax.jit(lambda q, k, v, o, l, do, dl: attention_bwd.backward(
          q, k, v, None, None, o, l, do, dl, plan, scale, cfg, False))
      ms = time_ms(whole, q, k, v, out, lse, do, dlse)
      lo, hi, c = (jnp.asarray(x, jnp.int32) for x in (plan.q_lo, plan.q_hi, plan.kv_c))
      from pallas_kernels.gpu.mosaic_gpu.tables import backward_mma_inputs
      mma = backward_mma_inputs(plan, scale)
      lse2 = lse * math.log2(math.e)
      dq_fn = jax.jit(lambda q, k, v, do, l2, dl: attention_bwd_dq.dq(
          q, k, v, do, l2, dl, lo, hi, c, [], bmap=plan.block_map, scale=scale, mask_fn=None,
          interpret=False, mma=None if mma is None else mma[0]))
      ms_dq = time_ms(dq_fn, q, k, v, do, lse2, jnp.zeros_like(lse2))
      blocks = int(np.asarray(plan.block_map.kv_counts).sum())
      rows.record(case=label, part="probe", ms_backward=ms, ms_dq=ms_dq,
                  ms_dkv=ms - ms_dq, blocks=blocks,
                  ns_per_block_dq=ms_dq * 1e6 / (blocks * b * h),
                  ns_per_block_dkv=(ms - ms_dq) * 1e6 / (blocks * b * h))
    except Exception as e:  # noqa: BLE001
      rows.record(case=label, part="probe", error=repr(e)[:400])


if __name__ == "__main__":
  main()
