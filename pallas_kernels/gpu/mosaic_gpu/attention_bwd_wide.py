"""The Hopper backward at head_dim 129-256 (run at 160, 192 or 256 columns): dK/dV and dQ kernels
whose two compute warpgroups split the work by role instead of by rows.

At head_dim 256 one warpgroup cannot hold both dK and dV of 64 key rows (64 x 256 float32
each: 128 registers a thread apiece), nor the 128-row kernels' shared memory (`attention_bwd`,
`attention_bwd_dq`). So a CTA owns 64 rows (the forward's 64-key blocks, or half a 128-row Q
block) and its warpgroups share one 64 x 64 product through shared memory:

dK/dV (CTA: a 64-key KV block and its Q list, over the transposed map; rows = keys):

    warpgroup 0:  Sᵀ = K Qᵀ → Pᵀ (masked) → shared memory;  dV += Pᵀ dO
    warpgroup 1:  dPᵀ = V dOᵀ;  Pᵀ ← shared memory;  dSᵀ = Pᵀ ∘ (dPᵀ − delta);  dK += dSᵀ Q

dQ (CTA: 64 query rows and their KV list, over the forward map):

    warpgroup 0:  S = Q Kᵀ → P (masked) → shared memory
    warpgroup 1:  dP = dO Vᵀ;  P ← shared memory;  dS = P ∘ (dP − delta) → shared memory
    both:         dQ[:, own columns] += dS K[:, own columns]

(Q is held as two column parts, so that each warpgroup's dQ leaves through its part: 128
columns each at 256; 64 for warpgroup 0 and 128 for warpgroup 1 at 192, `_column_parts`.)

Each does about half the matmul work of a step (FLOPs as the 128-row kernels: no
recomputation).
They meet once per step in the dK/dV kernel (Pᵀ double-buffered by step parity) and twice
in the dQ kernel (single buffers: each meeting orders the next write after the last read).
Pᵀ is exchanged in the input dtype (the dV product takes it so anyway). Masks are the
128-row kernels' element tests (interval dims, a mask function, segment ids; no MMA bias,
neighborhoods included: `auto` runs them here at this head_dim, 1.8-2.9x faster than the
Triton kernels), applied by warpgroup 0.
Static maps, runtime maps and documents' maps take the 128-row dK/dV kernel's work items
(`work_items.item_lists`). The memory warpgroup loads as in the 128-row kernels.

Interpret mode (CPU): no register operands and no accumulation into a live accumulator: dSᵀ
goes through shared memory there and products land in fresh accumulators (`mma_add`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_sparse_attn.softcap import capped2, slope2

from . import attention_bwd_dq as bwd_dq
from .attention_bwd_dq import backward_mesh, mma_add
from .config import _COMPUTE_WGS as _WGS, _ROWS, interpret_params, swizzled, swizzled_f32
from .element import mask_intervals

LOG2E = math.log2(math.e)
HEAD_DIMS = (160, 192, 256)  # the columns these kernels run (129-160 at 160, to 192 at 192,
                             # 193-256 at 256)
BLOCK_KV = _ROWS  # keys of a KV block (the forward's at this head_dim)
STAGES = 2
REGISTERS = (232, 40)  # compute / memory warpgroups


def _column_parts(head_dim: int) -> tuple[tuple[int, int], ...]:
  """Each compute warpgroup's (first column, columns) of dQ in the dQ kernel, whole swizzle
  groups: 128 each at 256; at 192 warpgroup 0 (which also forms P and applies the masks)
  takes 64, warpgroup 1 128 (H200: 128/64 trained 3-5% slower, docs/performance.md); at 160
  (32-column groups) 64 and 96."""
  own0 = 64 * (head_dim // 64 // _WGS)
  return (0, own0), (own0, head_dim - own0)


def _iota(tile, dim):
  return plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, tile, dim), plgpu.Layout.WGMMA)


def _cap_slope(p, lse2, cap: float):
  """The soft cap's slope 1 - tanh² for the warpgroup that forms dS but not the scores: the
  capped score is log2(P) + lse₂ (log2 units), from P as the other warpgroup shared it (in
  the input dtype: a relative error of 2^-9 in P moves the capped score by < 0.003, against
  caps of tens). 0 where P is 0 (masked keys, rows that saw nothing: lse₂ = +inf)."""
  return jnp.where(p > 0.0, slope2(jnp.log2(p) + lse2, cap), 0.0)


def _accumulate(acc, a, b, interpret: bool):
  """acc + a @ b (a from registers or shared memory, b from shared memory)."""
  if interpret:
    return mma_add(acc, a, b)

  def product(ref):
    plgpu.wgmma(ref, a, b)
  return pl.run_state(product)(plgpu.ACC.init(acc))


def _dkv_kernel(items_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, lo_ref, hi_ref, c_ref, *refs, item_lists, groups: int, dims: int,
                sub: int, block_q: int, scale: float, dtype, interpret: bool, head_dim: int,
                mask_fn=None, segments: bool = False, direct: bool = False,
                segments_full: bool = False, terms: int = 1, softcap: float | None = None):
  """CTA (work item, kv head, batch): `attention_bwd._kernel`'s arrays with 64-key KV blocks
  (items, ids and counts of the transposed map; lo/hi [dims, n_q], c [dims, n_kv]); dk/dv
  [b, n_kv, hkv, head_dim] stored (``direct``) or float32 reduce-added."""
  extras = int(segments)
  qx_ref, kx_ref = refs[:2] if extras else (None, None)
  dk_ref, dv_ref = refs[2 * extras:]
  item = lax.axis_index("kv")
  kv_head, batch = lax.axis_index("head"), lax.axis_index("batch")
  kv_block, first, entries, full, q_block = item_lists(items_ref, ids_ref, counts_ref, item,
                                                       kv_head, batch)
  kv0 = kv_block * BLOCK_KV
  n_full, n_all, bases, total = bwd_dq.item_steps(full, entries, sub, groups)
  qk_scale = scale * LOG2E
  tile = (_ROWS, _ROWS)

  def step_q(j, t):
    return bwd_dq.step_rows(q_block, j, t - bases[j], sub, block_q), kv_head * groups + j

  def body(k_smem, v_smem, c_smem, slots, lse_smem, delta_smem, lo_smem, hi_smem, p_smem,
           ds_smem, kx_smem, qx_smem, kv_bar, q_bar, q_free, turn):
    wg = lax.axis_index("wg")
    (q_smem, do_smem), stage = slots
    rows, cols = bwd_dq.tile_vectors(tile)

    rendezvous = functools.partial(bwd_dq.rendezvous, turn)

    def compute(role: int):
      plgpu.set_max_registers(REGISTERS[0], action="increase")
      plgpu.barrier_wait(kv_bar)
      coords = [rows(c_smem.at[d]) for d in range(dims)] if role == 0 else []
      keys_x = rows(kx_smem.at[0]) if extras and role == 0 else None

      def step(t, acc, j: int, masked: bool):
        slot = lax.rem(t, STAGES)
        q0, _ = step_q(j, t)
        plgpu.barrier_wait(q_bar.at[slot])
        p_buf = p_smem.at[lax.rem(t, 2)]
        if role == 0:  # Sᵀ → Pᵀ, shared; dV += Pᵀ dO
          def s_product(ref):
            plgpu.wgmma(ref, k_smem, q_smem.at[slot].transpose((1, 0)))
            return ref[...]
          s_t = pl.run_scoped(s_product, plgpu.ACC(tile, jnp.float32))
          p_t = jnp.exp2(capped2(s_t * qk_scale, softcap) - cols(lse_smem.at[slot]))
          if masked:
            def in_dim(d):
              return ((coords[d] >= cols(lo_smem.at[slot, d]))
                      & (coords[d] <= cols(hi_smem.at[slot, d])))
            p_t = mask_intervals(p_t, in_dim, dims, terms)
            if mask_fn is not None:  # rows are keys, columns queries
              p_t = jnp.where(mask_fn(q0 + _iota(tile, 1), kv0 + _iota(tile, 0)), p_t, 0.0)
          if segments and (masked or not segments_full):
            p_t = jnp.where(cols(qx_smem.at[slot, 0]) == keys_x, p_t, 0.0)
          p16 = p_t.astype(dtype)
          p_buf[...] = p16
          plgpu.commit_smem()
          rendezvous()  # Pᵀ written; the other buffer's last reader is done
          acc = _accumulate(acc, p_buf if interpret else p16, do_smem.at[slot], interpret)
        else:  # dPᵀ; dSᵀ = Pᵀ ∘ (dPᵀ − delta); dK += dSᵀ Q
          def dp_product(ref):
            plgpu.wgmma(ref, v_smem, do_smem.at[slot].transpose((1, 0)))
            return ref[...]
          dp_t = pl.run_scoped(dp_product, plgpu.ACC(tile, jnp.float32))
          rendezvous()
          p_t = plgpu.load(p_buf, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
          ds_t = p_t * (dp_t - cols(delta_smem.at[slot]))
          if softcap is not None:  # the cap's slope, from P and lse (`_cap_slope`)
            ds_t = ds_t * _cap_slope(p_t, cols(lse_smem.at[slot]), softcap)
          ds16 = ds_t.astype(dtype)
          if interpret:
            ds_smem[...] = ds16
            plgpu.commit_smem()
            ds16 = ds_smem
          acc = _accumulate(acc, ds16, q_smem.at[slot], interpret)
        plgpu.barrier_arrive(q_free.at[slot])
        return acc

      acc = plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
      for j in range(groups):  # full steps, then partial ones, for each query head
        acc = lax.fori_loop(bases[j], bases[j] + n_full[j],
                            functools.partial(step, j=j, masked=False), acc)
        acc = lax.fori_loop(bases[j] + n_full[j], bases[j + 1],
                            functools.partial(step, j=j, masked=True), acc)
      rendezvous()  # both past their last step: the slots are free for the store
      value, ref = (acc, dv_ref) if role == 0 else (acc * scale, dk_ref)
      value = value.astype(ref.dtype)
      dst = ref.at[batch, pl.ds(kv0, BLOCK_KV), kv_head]
      if interpret:
        dst[...] = value if direct else dst[...] + value
      else:
        stage.at[role][...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage.at[role], dst, reduction_op=None if direct else "add")
        plgpu.wait_smem_to_gmem(0)

    for role in range(_WGS):
      pl.when((wg == role) & (total > 0))(functools.partial(compute, role))

    @pl.when((wg == _WGS) & (total > 0))
    def _memory():
      plgpu.set_max_registers(REGISTERS[1], action="decrease")
      bwd_dq.load_key_rows((k_ref, v_ref, c_ref, kx_ref), (k_smem, v_smem, c_smem, kx_smem),
                           batch, pl.ds(kv0, BLOCK_KV), kv_head, kv_bar)

      def load(j, t):
        slot = bwd_dq.free_slot(q_free, t, STAGES)
        q0, head = step_q(j, t)

        bwd_dq.load_query_rows(
            (q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qx_ref),
            (q_smem.at[slot], do_smem.at[slot], lse_smem.at[slot], delta_smem.at[slot],
             lo_smem.at[slot], hi_smem.at[slot], qx_smem.at[slot] if extras else None),
            batch, pl.ds(q0, _ROWS), head, q_bar.at[slot])

      for j in range(groups):
        pl.loop(bases[j], bases[j + 1])(functools.partial(load, j))
      for s in range(STAGES):  # observe each slot's last release before the barriers go
        pl.when(s < total)(lambda: plgpu.barrier_wait(q_free.at[s]))

  tiles = swizzled(head_dim)  # the 16-bit tiles that meet a head_dim operand
  pl.run_scoped(
      body,
      plgpu.SMEM((BLOCK_KV, head_dim), dtype, transforms=tiles),
      plgpu.SMEM((BLOCK_KV, head_dim), dtype, transforms=tiles),
      plgpu.SMEM((dims, BLOCK_KV), jnp.int32),
      plgpu.RefUnion(
          (plgpu.SMEM((STAGES, _ROWS, head_dim), dtype, transforms=tiles),
           plgpu.SMEM((STAGES, _ROWS, head_dim), dtype, transforms=tiles)),
          plgpu.SMEM((_WGS, BLOCK_KV, head_dim), dtype, transforms=tiles) if direct else
          plgpu.SMEM((_WGS, BLOCK_KV, head_dim), jnp.float32,
                     transforms=swizzled_f32(head_dim))),
      *bwd_dq.query_vectors((STAGES,), _ROWS, dims),
      plgpu.SMEM((2, _ROWS, _ROWS), dtype, transforms=tiles),
      plgpu.SMEM((_ROWS, _ROWS), dtype, transforms=tiles) if interpret else None,
      plgpu.SMEM((extras, BLOCK_KV), jnp.int32) if extras else None,
      plgpu.SMEM((STAGES, extras, _ROWS), jnp.int32) if extras else None,
      plgpu.Barrier(num_arrivals=3 + extras),
      plgpu.Barrier(num_arrivals=6 + extras, num_barriers=STAGES),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=STAGES),
      plgpu.Barrier(num_arrivals=_WGS),
      collective_axes="wg",
  )


def _dq_kernel(order_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, lo_ref, hi_ref, c_ref, *refs, groups: int, dims: int, scale: float,
               dtype, interpret: bool, head_dim: int, block_q: int, mask_fn=None,
               segments: bool = False, runtime: bool = False, segments_full: bool = False,
               shared: bool = False, terms: int = 1, softcap: float | None = None):
  """CTA (64 query rows in visiting order, query head, batch): order [2 n_q blocks] (Q block
  · 2 + half), the forward map's ids [n_q blocks, max kv] and counts [n_q blocks, 2] (a
  runtime map: [b, h, ...]) over 64-key KV blocks; dq [b, n_q, h, head_dim] written."""
  if segments:
    qx_ref, kx_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  head, batch = lax.axis_index("head"), lax.axis_index("batch")
  rows64 = order_ref[lax.axis_index("q")]
  q_block = lax.div(rows64, 2)
  kv_head = lax.div(head, groups)
  n_full, n_all, kv_block = bwd_dq.row_list(counts_ref, ids_ref, batch, head, q_block,
                                            runtime, shared)
  q0 = q_block * block_q + lax.rem(rows64, 2) * _ROWS
  qk_scale = scale * LOG2E
  tile = (_ROWS, BLOCK_KV)
  parts = _column_parts(head_dim)

  def body(q_parts, do_smem, k_smem, v_smem, c_smem, lse_smem, delta_smem, lo_smem, hi_smem,
           qx_smem, kx_smem, p_smem, ds_smem, q_bar, kv_bar, kv_free, turn):
    wg = lax.axis_index("wg")
    rows, cols = bwd_dq.tile_vectors(tile)

    rendezvous = functools.partial(bwd_dq.rendezvous, turn)

    def compute(role: int):
      plgpu.set_max_registers(REGISTERS[0], action="increase")
      plgpu.barrier_wait(q_bar)
      own = pl.ds(*parts[role])
      if role == 0:
        lse = rows(lse_smem)
        lo = [rows(lo_smem.at[d]) for d in range(dims)]
        hi = [rows(hi_smem.at[d]) for d in range(dims)]
        q_x = rows(qx_smem.at[0]) if segments else None
      else:
        delta = rows(delta_smem)

      def step(e, dq, masked: bool):
        slot = lax.rem(e, STAGES)
        plgpu.barrier_wait(kv_bar.at[slot])
        if role == 0:  # S → P, shared
          def s_product(ref):  # Q in two column parts (each part of dQ leaves through one)
            for w in range(_WGS):
              plgpu.wgmma(ref, q_parts[w],
                          k_smem.at[slot, :, pl.ds(*parts[w])].transpose((1, 0)))
            return ref[...]
          s = pl.run_scoped(s_product, plgpu.ACC(tile, jnp.float32))
          p = jnp.exp2(capped2(s * qk_scale, softcap) - lse)
          if masked:
            def in_dim(d):
              c = cols(c_smem.at[slot, d])
              return (c >= lo[d]) & (c <= hi[d])
            p = mask_intervals(p, in_dim, dims, terms)
            if mask_fn is not None:
              kv0 = kv_block(e) * BLOCK_KV
              p = jnp.where(mask_fn(q0 + _iota(tile, 0), kv0 + _iota(tile, 1)), p, 0.0)
          if segments and (masked or not segments_full):
            p = jnp.where(cols(kx_smem.at[slot, 0]) == q_x, p, 0.0)
          p_smem[...] = p.astype(dtype)
          plgpu.commit_smem()
          rendezvous()  # P written
          rendezvous()  # dS written
        else:  # dP; dS = P ∘ (dP − delta), shared
          def dp_product(ref):
            plgpu.wgmma(ref, do_smem, v_smem.at[slot].transpose((1, 0)))
            return ref[...]
          dp = pl.run_scoped(dp_product, plgpu.ACC(tile, jnp.float32))
          rendezvous()
          p = plgpu.load(p_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
          ds = p * (dp - delta)
          if softcap is not None:  # the cap's slope, from P and lse (`_cap_slope`)
            ds = ds * _cap_slope(p, rows(lse_smem), softcap)
          ds_smem[...] = ds.astype(dtype)
          plgpu.commit_smem()
          rendezvous()
        dq = _accumulate(dq, ds_smem, k_smem.at[slot, :, own], interpret)
        plgpu.barrier_arrive(kv_free.at[slot])
        return dq

      dq = plgpu.layout_cast(jnp.zeros((_ROWS, parts[role][1]), jnp.float32),
                             plgpu.Layout.WGMMA)
      dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), dq)
      rendezvous()  # Q's last reader is done: dQ leaves through Q's column parts
      q_parts[role][...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_parts[role], dq_ref.at[batch, pl.ds(q0, _ROWS), head, own])
      plgpu.wait_smem_to_gmem(0)

    for role in range(_WGS):
      pl.when(wg == role)(functools.partial(compute, role))

    @pl.when(wg == _WGS)
    def _memory():
      plgpu.set_max_registers(REGISTERS[1], action="decrease")
      q_rows = pl.ds(q0, _ROWS)
      for w in range(_WGS):  # Q in column parts
        plgpu.copy_gmem_to_smem(q_ref.at[batch, q_rows, head, pl.ds(*parts[w])],
                                q_parts[w], q_bar)
      bwd_dq.load_query_rows(
          (None, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qx_ref if segments else None),
          (None, do_smem, lse_smem, delta_smem, lo_smem, hi_smem, qx_smem), batch, q_rows,
          head, q_bar)

      @pl.loop(0, n_all)
      def _load(e):
        slot = bwd_dq.free_slot(kv_free, e, STAGES)

        keys = pl.ds(kv_block(e) * BLOCK_KV, BLOCK_KV)
        bwd_dq.load_key_rows((k_ref, v_ref, c_ref, kx_ref if segments else None),
                             (k_smem.at[slot], v_smem.at[slot], c_smem.at[slot],
                              kx_smem.at[slot] if segments else None),
                             batch, keys, kv_head, kv_bar.at[slot])

      for s in range(STAGES):
        pl.when(s < n_all)(lambda: plgpu.barrier_wait(kv_free.at[s]))

  extras = int(segments)
  tiles = swizzled(head_dim)  # the 16-bit tiles that meet a head_dim operand
  pl.run_scoped(
      body,
      [plgpu.SMEM((_ROWS, n), dtype, transforms=tiles) for _, n in parts],
      plgpu.SMEM((_ROWS, head_dim), dtype, transforms=tiles),
      *bwd_dq.key_slots(STAGES, BLOCK_KV, head_dim, dims, dtype),
      *bwd_dq.query_vectors((), _ROWS, dims),
      plgpu.SMEM((extras, _ROWS), jnp.int32) if extras else None,
      plgpu.SMEM((STAGES, extras, BLOCK_KV), jnp.int32) if extras else None,
      plgpu.SMEM((_ROWS, BLOCK_KV), dtype, transforms=tiles),
      plgpu.SMEM((_ROWS, BLOCK_KV), dtype, transforms=tiles),
      plgpu.Barrier(num_arrivals=5 + _WGS + extras),
      plgpu.Barrier(num_arrivals=3 + extras, num_barriers=STAGES),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=STAGES),
      plgpu.Barrier(num_arrivals=_WGS),
      collective_axes="wg",
  )


def backward(items, item_lists, counts, q, k, v, d_out, lse2, delta, lo, hi, c, extras, *, bmap,
             scale: float, mask_fn, interpret: bool, sub: int, block_q: int, direct: bool,
             fastest: tuple[bool, bool], terms: int = 1, softcap: float | None = None):
  """dq [b, n_q, h, d] (the input dtype), dk and dv [b, n_kv, hkv, d] (the input dtype if
  ``direct``, else float32) from `attention_bwd.backward`'s padded inputs: its work items and
  their `item_lists` (partial over the map's shape), the transposed and forward maps of
  ``bmap`` (64-key KV blocks); ``counts`` its transposed map's [.., kv blocks, 2] (full,
  all), as the caller built them for its items. ``fastest``: the work axis last in each kernel's grid."""
  b, _, h, d = q.shape
  n_kv, hkv = k.shape[1], k.shape[2]
  n_q = lse2.shape[-1]
  runtime = bmap.is_runtime
  segments = bool(extras)
  common = dict(groups=h // hkv, dims=lo.shape[0], scale=scale, dtype=q.dtype, head_dim=d,
                interpret=bool(interpret), mask_fn=mask_fn, segments=segments,
                segments_full=bmap.segments_full, terms=terms, softcap=softcap)
  params = plgpu.CompilerParams(approx_math=True)
  interp = interpret_params(interpret)

  def run(refs):
    pl.kernel(functools.partial(_dkv_kernel, item_lists=item_lists, sub=sub, block_q=block_q,
                                direct=direct, **common),
              out_type=(), mesh=backward_mesh(b, hkv, ("kv", items.shape[-2]), fastest[0]),
              compiler_params=params, interpret=interp, name="sparse_attention_bwd_wide")(
        items, jnp.asarray(bmap.q_ids, jnp.int32), jnp.asarray(counts, jnp.int32), q, k, v,
        d_out, lse2, delta, lo, hi, c, *extras, *refs)

  acc = k.dtype if direct else jnp.float32
  dk, dv = pl.run_state(run)((jnp.zeros((b, n_kv, hkv, d), acc),
                              jnp.zeros((b, n_kv, hkv, d), acc)))
  q_counts = (jnp.stack([bmap.kv_full_counts, bmap.kv_counts], axis=-1) if runtime else
              np.stack([np.asarray(bmap.kv_full_counts), np.asarray(bmap.kv_counts)], axis=1))
  if runtime:
    order = jnp.arange(2 * bmap.num_q_blocks, dtype=jnp.int32)
  else:  # longest lists first (as `attention_bwd_dq`), both halves of a Q block side by side
    blocks = np.argsort(-q_counts[:, 1], kind="stable")
    order = jnp.asarray(np.stack([2 * blocks, 2 * blocks + 1], 1).reshape(-1), jnp.int32)
  dq = pl.kernel(
      functools.partial(_dq_kernel, block_q=block_q, runtime=runtime,
                        shared=bmap.shares_heads, **common),
      out_type=jax.ShapeDtypeStruct((b, n_q, h, d), q.dtype),
      mesh=backward_mesh(b, h, ("q", 2 * bmap.num_q_blocks), fastest[1]),
      compiler_params=params, interpret=interp, name="sparse_attention_bwd_dq_wide",
  )(order, jnp.asarray(bmap.kv_ids, jnp.int32), jnp.asarray(q_counts, jnp.int32), q, k, v,
    d_out, lse2, delta, lo, hi, c, *extras)
  return dq, dk, dv
