"""Block-sparse flash attention backward for Hopper in Pallas Mosaic GPU: dK and dV.

Two forms (`policy.separate_dq` picks one per map and head_dim): two kernels, as
FlashAttention-2 splits the work, this one (dK/dV over the transposed block map) and
`attention_bwd_dq` (dQ over the forward map, no reductions), run as one launch (`JOINT_DQ`:
the dK/dV work items, then the dQ CTAs), where KV blocks visit few Q blocks; or this kernel
also forming dQ (the fused form below, `MosaicGPUConfig.backward_dq="split" | "own"`: 5
matmuls per block pair instead of 7, dQ reduce-added in float32) where they visit many. This
kernel: a CTA runs one work item: a KV block of 128 rows (of a KV head and batch element) and
a chunk of its Q list (`work_items.static_items`: long lists, e.g. a sink's, are cut so that
one CTA does not set the kernel's length), and keeps K and V in shared memory; two compute
warpgroups own 64 of its rows each and hold their dK and dV accumulators in registers; the
third, the memory warpgroup, walks the chunk's Q blocks (``q_ids``; each 128-row Q block as
two 64-row steps, every query head of the GQA group in turn) and TMA-loads each step's Q, dO,
log-sum-exp and delta (and the step's query intervals) into a ring of slots. Per step and
warpgroup (all in the transposed domain, rows = keys):

    Sᵀ = K Qᵀ, dPᵀ = V dOᵀ                 (two wgmmas, one wait; the accumulators start
                                            from −lse₂/(scale·log2 e) and −delta, `LSE_IN_ACC`)
    Pᵀ = exp2(Sᵀ·scale·log2 e − lse₂)        (masked: 0 outside each query's intervals)
    dSᵀ = Pᵀ ∘ (dPᵀ − delta)
    dV += Pᵀ dO,  dK += dSᵀ Q               (Pᵀ, dSᵀ from registers)
    dQ[q, :] += dS K                        (fused form only) → fp32 TMA reduce-add

In the fused form dSᵀ goes through shared memory, and dQ needs every key row of the step: with
head_dim 128 each warpgroup computes 64 of dQ's columns from both halves of dSᵀ (one 64×64
reduce-add per warpgroup), step t−1's at step t once the other warpgroup's half is written
(`DEFERRED_DQ`; before, the warpgroups met after dSᵀ every step); with head_dim 64 each adds
its own rows' share. Full blocks run with no mask arithmetic; partial ones of
neighborhoods add the forward's MMA bias (one wgmma of the KV block's one-hot coordinates [64,
W] by the step's host-built test matrix [W, 64 queries], `tables.backward_mma_inputs`), other
partial ones test each key's coordinates against the query's interval per mask dimension (the
forward's element test), a mask function (on kernel positions) and segment ids (these on every
block). dK/dV of chunked lists (and the fused form's dQ) are float32 reduce-adds, so their
rounding varies with the CTA schedule (as in FlashAttention-3 and cuDNN).

head_dim 129-256 (at 160, 192 or 256 columns) runs `attention_bwd_wide` instead: 64-row CTAs
whose two compute warpgroups split a step by role (one Sᵀ/Pᵀ and dV, the other dPᵀ/dSᵀ and
dK).

Interpret mode (CPU) has no TMA reductions, no register operands and no accumulation into
a live accumulator: there the warpgroups add their dQ share in turn with plain loads and
stores, Pᵀ goes through shared memory, and products land in fresh accumulators.
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

from jax_sparse_attn import masks
from jax_sparse_attn.backends import backward_delta
from jax_sparse_attn.plan import AttentionPlan, gathered, walked_map
from jax_sparse_attn.softcap import capped2, slope2

from .. import triton_attention
from . import attention_bwd_dq as bwd_dq
from . import attention_bwd_wide as bwd_wide
from . import attention_fwd as fwd
from . import policy, work_items
from .attention_bwd_dq import mma_add
from .boxes import _Boxes, _view, _window_groups, _window_view, caller_order, kernel_order
from .cost import window_dq_tile
from .element import mask_intervals, mask_vectors
from .tables import backward_mma_inputs, window_dq_inputs
from .config import _COMPUTE_WGS as _WGS, _ROWS  # rows: KV rows owned, Q rows per step
from .config import _MAX_BACKWARD_HEAD_DIM, _config, _padded_head_dim, unsupported
from .config import swizzled, swizzled_f32
from .config import box_copies, interpret_params

LOG2E = math.log2(math.e)
_BLOCK_KV = _WGS * _ROWS
# With one work item per KV block, store dK/dV in the input dtype instead of float32
# reduce-adds into zero-filled buffers and a cast. H200, causal window 2048 at S=32768
# (H=16, D=128): backward 3.48 vs 3.84 ms (docs/experiments/h200-2026-11-29-direct-dkv.json);
# causal S=16384 too since its lists are cut only at outliers (`work_items.static_items`).
DIRECT_DKV = True
# Where some KV blocks' lists are cut into several items (a sink's, which every query visits):
# the other KV blocks' items store dK/dV in the input dtype too, and only the cut blocks'
# items reduce-add into a float32 buffer of those blocks (``direct="mixed"``); False: every
# item reduce-adds into float32 buffers of the whole K/V.
MIXED_DKV = True
# With dQ as its own kernel and every KV block one item's: dK/dV as the kernel's outputs
# instead of zero-filled buffers it writes into (False: the buffers).
WRITTEN_DKV = True
# The dQ kernel skips them too (64-key halves per warpgroup) where the dK/dV kernel does.
# H200, the LM layer: fwd+bwd 0.887-0.905 ms against 0.925-0.937 with the dK/dV kernel's
# skips alone and 0.942-0.949 with none, gradients equal; at head_dim 64 (8/2 heads) within
# noise, 0.366-0.377 vs 0.355-0.405 vs 0.375 (docs/experiments/h200-2026-12-05-quarters-dq.json).
QUARTERS_DQ = True
# A runtime map's whole-list items (`work_items.RUNTIME_ITEMS`) write dK/dV as the kernel's
# outputs, an item with no entries zeros (False: zero-filled buffers the items store into). A
# lab switch, off: H100, MoBA S=32768 fwd+bwd 8.12-8.19 ms against 8.00-8.15 with the fill (and
# 8.14-8.22 with dQ as its own kernel besides): the 80 us fill in the profile buys nothing
# (docs/experiments/h100-2026-12-05-runtime-written.json).
WRITTEN_RUNTIME = False
# Documents' maps walked with the static map's work items (False: `work_items.runtime_items`,
# built on device for per-head rows; several times more CTAs, most with no work, and dK/dV
# reduce-added).
SHARED_STATIC_ITEMS = True
# Registers a thread of the compute and memory warpgroups: the fused form (dQ reduce-added
# here) at 240/24 spills a third less than at 232/40 and runs dense S=16384 in 23.0 ms instead
# of 26.1 (H200, docs/experiments/h200-2026-12-03-fused-registers.json); the two-kernel form's
# dK/dV kernel barely spills at 232/40 (24 bytes) and is 1% slower at 240/24.
REGISTERS = (232, 40)
FUSED_REGISTERS = (240, 24)
# The step's log-sum-exp and delta enter Sᵀ and dPᵀ as their accumulators' initial values
# (Sᵀ from −lse₂ / (scale·log2 e), dPᵀ from −delta) instead of column vectors subtracted after
# the wgmmas: the two 16-register broadcasts are no longer live beside Sᵀ, dPᵀ, dK and dV
# (not with soft-capping, which caps the bare score first). H200, backward ms dense / causal
# S=16384 / the LM mask: two kernels 22.6 / 11.6 / 0.65-0.66 against 23.5 / 12.0 / 0.67;
# with DEFERRED_DQ below the fused form 19.9 / 10.1 against 22.3 / 11.3, each switch alone
# ~2% / 0% (docs/experiments/h200-2026-12-07-deferred-dq.json).
LSE_IN_ACC = True
# The fused form at head_dim 128 ("split") forms step t−1's dQ at step t, after issuing step
# t's dV and dK, instead of meeting the other warpgroup after dSᵀ(t) each step: a warpgroup
# waits only for the other's half of dSᵀ(t−1) (barriers ``written``/``consumed`` per dSᵀ
# buffer), so the two need not run their softmax in lockstep while the tensor cores idle.
# The first step forms a zero dQ from a zeroed buffer (no branch), the last dQ follows the
# loop. "pingpong": also the schedule barrier (`MosaicGPUConfig.backward_pingpong`), one
# warpgroup's softmax beside the other's matmuls: 20.2 / 10.5 ms, slower than without it
# (19.9 / 10.1 with LSE_IN_ACC; H200, the dense / causal backward above).
DEFERRED_DQ: bool | str = True


def _kernel(items_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
            lo_ref, hi_ref, c_ref, *refs, head_dim: int, groups: int, dims: int, sub: int,
            block_q: int, stages: int, scale: float, dtype, interpret: bool, split_dq: bool,
            mask_fn=None, segments: bool = False, chunk: int = 0, pingpong: bool = False,
            with_dq: bool = True, direct: bool | str = False, segments_full: bool = False,
            shared: bool = False, mma_width: int = 0, terms: int = 1, quarters: bool = False,
            cta=None, zero_empty: bool = False, softcap: float | None = None,
            deferred: bool = False):
  """CTA (work item, kv head, batch) over the transposed map (the grid's axes "kv", "head" and
  "batch", or ``cta``: their indices in a joint launch, `JOINT_DQ`): items [n, 3] (kv block,
  first entry of its Q list, entries: a KV block's list in chunks,
  `work_items.static_items`), ids [kv blocks, max q blocks], counts [kv blocks, 2] (full,
  all). q/do [b, n_q, h, d]; lse₂ (log2 units, +inf where no key was seen) and delta [b, h,
  n_q]; lo/hi [dims, n_q], c [dims, n_kv] (``terms`` > 1: a union, `plan.any_term`);
  dq [b, n_q, h, d], dk/dv [b, n_kv, hkv, d] float32, accumulated into (zero-filled).

  A runtime map (``chunk`` > 0: content-routed attention) has rows per (batch, query head):
  items [b, hkv, n, 2] (kv block, chunk of ``chunk`` entries; kv block = n_kv: no work,
  `work_items.runtime_items`), ids [b, h, kv blocks, max q blocks], counts [b, h, kv blocks,
  2]; each query head of the GQA group walks its own list.

  MMA-bias masks (``mma_width`` > 0, neighborhoods: `tables.backward_mma_inputs`): onehot
  [128, W] of the KV block's coordinates, tables [n, W, 64] and table_ids [kv blocks, 2 * max
  q] (entry e's 64-row halves at 2e, 2e + 1) follow the arrays above and replace the interval
  test of partial blocks. ``quarters`` (dQ its own kernel): then `tables.live_quarters`'
  transposed map bits [kv blocks, max q]; a warpgroup skips the partial steps whose queries
  none of its 64 keys may see.

  ``zero_empty`` (``direct``, one item per KV block: a runtime map's whole lists): an item
  with no entries stores zeros as its block's dK/dV, so they need no zero fill.

  ``softcap``: scores soft-capped before the mask (`softcap.capped2`), dSᵀ times the cap's
  slope.

  ``deferred`` (``split_dq``): step t forms step t−1's dQ (`DEFERRED_DQ`)."""
  # Segment ids as vectors of the element test (`attention_fwd._extras`): qx [b, 1, n_q] and
  # kx [b, 1, n_kv]; a mask function runs on kernel positions.
  extras = int(segments)
  mma = mma_width > 0
  qx_ref, kx_ref = refs[:2] if extras else (None, None)
  refs = refs[2 * extras:]
  onehot_ref, tables_ref, table_ids_ref = refs[:3] if mma else (None,) * 3
  refs = refs[3:] if mma else refs
  quarters_ref, refs = (refs[0], refs[1:]) if quarters else (None, refs)
  mixed = direct == "mixed"
  if mixed:  # then the cut KV blocks' float32 buffers, [b, cut blocks * 128, hkv, d]
    refs, (dk_cut_ref, dv_cut_ref) = refs[:-2], refs[-2:]
  dq_ref, dk_ref, dv_ref = ((None,) if not with_dq else ()) + tuple(refs)
  dq_cols = 64 if split_dq else head_dim
  item, kv_head, batch = cta or [lax.axis_index(a) for a in ("kv", "head", "batch")]
  kv_block, first, entries, full, q_block = work_items.item_lists(
      items_ref, ids_ref, counts_ref, item, kv_head, batch, groups=groups, chunk=chunk,
      shared=shared)
  kv0 = kv_block * _BLOCK_KV
  # Steps of 64 query rows, query head after query head of the group (head j's steps start
  # at bases[j]): its entries' full blocks, then partial ones.
  n_full, n_all, bases, total = bwd_dq.item_steps(full, entries, sub, groups)
  qk_scale = scale * LOG2E
  lse_in_acc = LSE_IN_ACC and softcap is None

  def step_q(j, t):
    """(first query row, query head) of step t, one of head j's."""
    return bwd_dq.step_rows(q_block, j, t - bases[j], sub, block_q), kv_head * groups + j

  def step_table(j, t):
    """The MMA-bias table of step t (one of head j's): its entry's half (static maps)."""
    r = t - bases[j]
    return table_ids_ref[kv_block, (first + lax.div(r, sub)) * sub + lax.rem(r, sub)]

  def body(k_smem, v_smem, c_smem, slots, lse_smem, delta_smem, lo_smem, hi_smem,
           ds_smem, dq_smem, p_smem, kx_smem, qx_smem, onehot_smem, table_smem, kv_bar, q_bar,
           q_free, turn, sched, written, consumed):
    wg = lax.axis_index("wg")
    (q_smem, do_smem), stage, *stage_cut = slots  # stage_cut: float32 (``mixed``)

    rendezvous = functools.partial(bwd_dq.rendezvous, turn)

    def schedule():
      """Ping-pong: a warpgroup passes after issuing its matmuls, once the other is done
      with its softmax (warpgroup 1 starts one phase behind)."""
      if pingpong:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    if zero_empty:
      @pl.when((wg < _WGS) & (total == 0))
      def _zeros():  # a KV block that no query visits: its rows of dK/dV are zeros
        own_rows = (batch, pl.ds(kv0 + wg * _ROWS, _ROWS), kv_head)
        zero = jnp.zeros((_ROWS, head_dim), dtype)
        if interpret:
          for w in range(_WGS):
            @pl.when(wg == w)
            def _():
              dk_ref.at[own_rows][...] = zero
              dv_ref.at[own_rows][...] = zero
            rendezvous()
          return
        stage.at[wg][...] = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage.at[wg], dk_ref.at[own_rows])
        plgpu.copy_smem_to_gmem(stage.at[wg], dv_ref.at[own_rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when((wg < _WGS) & (total > 0))
    def _compute():
      plgpu.set_max_registers((FUSED_REGISTERS if with_dq else REGISTERS)[0],
                              action="increase")
      own = pl.ds(wg * _ROWS, _ROWS)
      plgpu.barrier_wait(kv_bar)
      rows, cols = bwd_dq.tile_vectors((_ROWS, _ROWS))
      col_vector = lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))
      cols_of = lambda vec: plgpu.layout_cast(
          lax.broadcast_in_dim(vec, (_ROWS, _ROWS), [1]), plgpu.Layout.WGMMA)
      coords = [rows(c_smem.at[wg, d]) for d in range(dims)]
      keys_x = [rows(kx_smem.at[wg, i]) for i in range(extras)]

      def step(t, carry, j: int, masked: bool):
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(q_bar.at[slot])
        if not (quarters and masked):
          return step_products(carry, t, j, masked, slot)
        # A step whose 64 queries none of my keys may see (`tables.live_quarters`): skipped
        # (the deferred fused form still writes zeros as its half of dSᵀ and forms dQ(t−1)).
        r = t - bases[j]
        bits = quarters_ref[kv_block, first + lax.div(r, sub)]
        live = lax.shift_right_logical(bits, 2 * lax.rem(r, sub) + wg) & 1
        carry = lax.cond(live != 0, functools.partial(step_products, t=t, j=j, masked=True,
                                                      slot=slot, release=False),
                         functools.partial(dead_step, t=t, j=j) if deferred else lambda c: c,
                         carry)
        plgpu.barrier_arrive(q_free.at[slot])
        return carry

      def step_products(carry, t, j: int, masked: bool, slot, release: bool = True):
        """Step t's products (of query head j); ``release``: then its slot."""
        dk, dv, *prev = carry  # deferred: step t−1's (first query row / 64, head)
        q0, head = step_q(j, t)

        def sdp(refs):
          s_ref, dp_ref = refs
          if masked and mma:  # the bias first: onehot [64 keys, W] @ test [W, 64 queries]
            plgpu.wgmma(s_ref, onehot_smem.at[wg], table_smem.at[slot])
          plgpu.wgmma(s_ref, k_smem.at[own], q_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, v_smem.at[own], do_smem.at[slot].transpose((1, 0)))
          schedule()
          if not lse_in_acc or interpret:
            return s_ref[...], dp_ref[...]

        if lse_in_acc:  # Sᵀ·scale·log2 e − lse₂ = scale·log2 e · (Sᵀ − lse₂ / (scale·log2 e))
          s0 = cols_of(col_vector(lse_smem.at[slot]) * (-1.0 / qk_scale))
          dp0 = cols_of(-col_vector(delta_smem.at[slot]))
          if interpret:  # no accumulation into a live accumulator there
            s_t, dp_t = pl.run_scoped(sdp, (plgpu.ACC((_ROWS, _ROWS), jnp.float32),) * 2)
            s_t, dp_t = s_t + s0, dp_t + dp0
          else:
            s_t, dp_t = pl.run_state(sdp)((plgpu.ACC.init(s0), plgpu.ACC.init(dp0)))
          p_t = jnp.exp2(s_t * qk_scale)
        else:
          s_t, dp_t = pl.run_scoped(sdp, (plgpu.ACC((_ROWS, _ROWS), jnp.float32),) * 2)
          s_t = capped2(s_t * qk_scale, softcap, floor=masked and mma)  # log2 units
          p_t = jnp.exp2(s_t - cols(lse_smem.at[slot]))
        def in_dim(d):  # rows are keys, columns queries
          return ((coords[d] >= cols(lo_smem.at[slot, d]))
                  & (coords[d] <= cols(hi_smem.at[slot, d])))

        if masked and not mma:
          p_t = mask_intervals(p_t, in_dim, dims, terms)
        if mask_fn is not None and masked:  # rows are keys, columns queries
          iota = lambda dim: plgpu.layout_cast(
              lax.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), dim), plgpu.Layout.WGMMA)
          p_t = jnp.where(mask_fn(q0 + iota(1), kv0 + wg * _ROWS + iota(0)), p_t, 0.0)
        if segments and (masked or not segments_full):
          p_t = jnp.where(cols(qx_smem.at[slot, 0]) == keys_x[0], p_t, 0.0)
        ds_t = p_t * (dp_t if lse_in_acc else dp_t - cols(delta_smem.at[slot]))
        if softcap is not None:  # through the cap
          ds_t = ds_t * slope2(s_t, softcap)
        # With split_dq the other warpgroup reads my dSᵀ: two buffers by step parity (I
        # rewrite one only after the next step's rendezvous, which follows its reads).
        # Without dQ (`attention_bwd_dq` makes it) dSᵀ stays in registers on the GPU.
        ds_ref = ds_smem.at[lax.rem(t, 2)] if split_dq else ds_smem
        ds16 = ds_t.astype(dtype)
        if deferred:  # the other warpgroup formed dQ(t−2) from this buffer
          plgpu.barrier_wait(consumed.at[lax.rem(t, 2)])
        if with_dq or interpret:
          ds_ref.at[own][...] = ds16
          ds16 = ds_ref.at[own]
        p16 = p_t.astype(dtype)
        if interpret:  # wgmma's operand A from shared memory only there
          p_smem.at[wg][...] = p16
          p16 = p_smem.at[wg]
        plgpu.commit_smem()
        if deferred:
          plgpu.barrier_arrive(written.at[lax.rem(t, 2)])

        def dq_operands():  # dS (a transposed view of dSᵀ) and the matching K columns
          if deferred:  # step t−1's, once both its halves are written
            return deferred_operands(t)
          if split_dq:
            return split_operands(ds_ref)
          return ds_ref.at[own].transpose((1, 0)), k_smem.at[own]

        schedule()

        def products(refs):  # dV, dK, then (once both dSᵀ halves are written) dQ
          dv_ref, dk_ref, *dq_acc = refs
          plgpu.wgmma(dv_ref, p16, do_smem.at[slot])
          plgpu.wgmma(dk_ref, ds16, q_smem.at[slot])
          if split_dq and not deferred:
            rendezvous()
          if with_dq:
            plgpu.wgmma(dq_acc[0], *dq_operands())

        dq0 = (plgpu.layout_cast(jnp.zeros((_ROWS, dq_cols), jnp.float32), plgpu.Layout.WGMMA)
               if with_dq else None)
        if interpret:  # the same products through fresh accumulators
          dv = mma_add(dv, p16, do_smem.at[slot])
          dk = mma_add(dk, ds16, q_smem.at[slot])
          if split_dq and not deferred:
            rendezvous()
          dq = mma_add(dq0, *dq_operands()) if with_dq else None
        elif with_dq:
          dv, dk, dq = pl.run_state(products)(
              (plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(dq0)))
        else:
          dv, dk = pl.run_state(products)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
        if deferred:  # its wgmma is done: the other warpgroup may rewrite the buffer
          plgpu.barrier_arrive(consumed.at[lax.rem(t + 1, 2)])
        if release:
          plgpu.barrier_arrive(q_free.at[slot])
        if not with_dq:
          return dk, dv
        if deferred:
          add_dq(dq, *prev)
          return dk, dv, lax.div(q0, _ROWS), head
        add_dq(dq, lax.div(q0, _ROWS), head)
        return dk, dv

      def dead_step(carry, t, j: int):
        """A deferred fused step with none of my keys live (`policy.FUSED_QUARTERS`): zeros as
        my half of dSᵀ(t), then dQ(t−1) as in `step_products`."""
        dk, dv, *prev = carry
        q0, head = step_q(j, t)
        plgpu.barrier_wait(consumed.at[lax.rem(t, 2)])
        ds_smem.at[lax.rem(t, 2)].at[own][...] = zero_half()
        plgpu.commit_smem()
        plgpu.barrier_arrive(written.at[lax.rem(t, 2)])
        dq = deferred_dq(t)
        plgpu.barrier_arrive(consumed.at[lax.rem(t + 1, 2)])
        add_dq(dq, *prev)
        return dk, dv, lax.div(q0, _ROWS), head

      def deferred_operands(t):
        """dQ(t−1)'s operands (`split_operands`), once both halves of dSᵀ(t−1) are written."""
        plgpu.barrier_wait(written.at[lax.rem(t + 1, 2)])
        return split_operands(ds_smem.at[lax.rem(t + 1, 2)])

      def deferred_dq(t):
        """dQ(t−1), my 64 columns, in a fresh accumulator."""
        def run(acc_ref):
          plgpu.wgmma(acc_ref, *deferred_operands(t))
          return acc_ref[...]

        if interpret:
          return mma_add(plgpu.layout_cast(jnp.zeros((_ROWS, dq_cols), jnp.float32),
                                           plgpu.Layout.WGMMA), *deferred_operands(t))
        return pl.run_scoped(run, plgpu.ACC((_ROWS, dq_cols), jnp.float32))

      def zero_half():  # zeros as my keys' half of a dSᵀ buffer
        return plgpu.layout_cast(jnp.zeros((_ROWS, _ROWS), dtype), plgpu.Layout.WGMMA)

      def split_operands(ds_buf):  # dS of both warpgroups' keys, my 64 columns of K
        return ds_buf.transpose((1, 0)), k_smem.at[:, pl.ds(wg * 64, 64)]

      def add_dq(dq, part, head):
        """Reduce-adds my share of a step's dQ into the 64-row ``part`` of query head
        ``head`` (the row's index / 64: a loop carry must show the rows' alignment)."""
        dst = dq_ref.at[batch, pl.ds(part * _ROWS, _ROWS), head]
        if split_dq:
          dst = dst.at[:, pl.ds(wg * 64, 64)]
        if interpret:  # the warpgroups add in turn
          for w in range(_WGS):
            @pl.when(wg == w)
            def _():
              dst[...] = dst[...] + dq
            rendezvous()
        else:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last reduce read its buffer
          dq_smem.at[wg][...] = dq
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(dq_smem.at[wg], dst, reduction_op="add")

      zeros = plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
      carry = (zeros, zeros)
      if deferred:  # "step −1": a zeroed dSᵀ buffer 1 (its dQ adds 0 to rows 0..63 of the
        # item's first query head)
        ds_smem.at[1].at[own][...] = zero_half()
        plgpu.commit_smem()
        plgpu.barrier_arrive(written.at[1])
        plgpu.barrier_arrive(consumed.at[0])
        carry = (*carry, jnp.int32(0), kv_head * groups)
      if pingpong:
        pl.when(wg == 1)(schedule)
      for j in range(groups):  # full steps, then partial ones, for each query head
        base = bases[j]
        carry = lax.fori_loop(base, base + n_full[j],
                              functools.partial(step, j=j, masked=False), carry)
        carry = lax.fori_loop(base + n_full[j], bases[j + 1],
                              functools.partial(step, j=j, masked=True), carry)
      dk, dv, *prev = carry
      if pingpong:  # warpgroup 0's last phase pairs with warpgroup 1's first
        pl.when(wg == 0)(schedule)
      if deferred:  # the last step's dQ
        add_dq(deferred_dq(total), *prev)
        # Observe the last step's release of the other buffer (its phase is unobserved).
        plgpu.barrier_wait(consumed.at[lax.rem(total, 2)])
      # Several items may share a KV block: dK and dV are reduce-added in float32, staged
      # in the step slots (free once both warpgroups are past their last step); with one
      # item per KV block (``direct``) they are stored in the input dtype. ``mixed``: items
      # with a cut slot (items[:, 3] >= 0) reduce-add into the cut blocks' float32 buffers
      # at that slot, the others store.
      rendezvous()
      own_rows = (batch, pl.ds(kv0 + wg * _ROWS, _ROWS), kv_head)
      cut = items_ref[item, 3] if mixed else None

      def write(value, ref, rows, add: bool, stage):
        value = value.astype(ref.dtype)
        if interpret:
          for w in range(_WGS):
            @pl.when(wg == w)
            def _():
              ref.at[rows][...] = (ref.at[rows][...] + value) if add else value
            rendezvous()
        else:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          stage.at[wg][...] = value
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(stage.at[wg], ref.at[rows],
                                  reduction_op="add" if add else None)

      for value, ref, cut_ref in ((dk * scale, dk_ref, dk_cut_ref if mixed else None),
                                  (dv, dv_ref, dv_cut_ref if mixed else None)):
        if not mixed:
          write(value, ref, own_rows, not direct, stage)
          continue
        pl.when(cut < 0)(lambda: write(value, ref, own_rows, False, stage))
        cut_rows = (batch, pl.ds(cut * _BLOCK_KV + wg * _ROWS, _ROWS), kv_head)
        pl.when(cut >= 0)(lambda: write(value, cut_ref, cut_rows, True, stage_cut[0]))
      plgpu.wait_smem_to_gmem(0)

    @pl.when((wg == _WGS) & (total > 0))
    def _memory():
      plgpu.set_max_registers((FUSED_REGISTERS if with_dq else REGISTERS)[1],
                              action="decrease")
      rows = (batch, pl.ds(kv0, _BLOCK_KV), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_bar)
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_bar)
      for w in range(_WGS):
        plgpu.copy_gmem_to_smem(c_ref.at[:, pl.ds(kv0 + w * _ROWS, _ROWS)], c_smem.at[w], kv_bar)
        if extras:
          plgpu.copy_gmem_to_smem(kx_ref.at[batch, :, pl.ds(kv0 + w * _ROWS, _ROWS)],
                                  kx_smem.at[w], kv_bar)
        if mma:
          plgpu.copy_gmem_to_smem(onehot_ref.at[pl.ds(w * _ROWS, _ROWS)], onehot_smem.at[w],
                                  kv_bar)

      def load(j, t):
        slot = bwd_dq.free_slot(q_free, t, stages)
        q0, head = step_q(j, t)

        bar = q_bar.at[slot]
        bwd_dq.load_query_rows(
            (q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qx_ref),
            (q_smem.at[slot], do_smem.at[slot], lse_smem.at[slot], delta_smem.at[slot],
             lo_smem.at[slot], hi_smem.at[slot], qx_smem.at[slot] if extras else None),
            batch, pl.ds(q0, _ROWS), head, bar)
        if mma:  # full entries load table 0 too: a fixed arrival count
          plgpu.copy_gmem_to_smem(tables_ref.at[step_table(j, t)], table_smem.at[slot], bar)

      for j in range(groups):
        pl.loop(bases[j], bases[j + 1])(functools.partial(load, j))

      # Observe each slot's last release before the barriers are freed.
      for s in range(stages):
        pl.when(s < total)(lambda: plgpu.barrier_wait(q_free.at[s]))

  # wgmma operands with K = W: (8, W) tiles, swizzle 2W bytes (as the forward's bias).
  narrow = ((plgpu.TilingTransform((8, mma_width)), plgpu.SwizzleTransform(2 * mma_width))
            if mma else None)
  tiles = swizzled(head_dim)  # the 16-bit tiles that meet a head_dim operand
  pl.run_scoped(
      body,
      plgpu.SMEM((_BLOCK_KV, head_dim), dtype, transforms=tiles),
      plgpu.SMEM((_BLOCK_KV, head_dim), dtype, transforms=tiles),
      plgpu.SMEM((_WGS, dims, _ROWS), jnp.int32),
      plgpu.RefUnion(
          (plgpu.SMEM((stages, _ROWS, head_dim), dtype, transforms=tiles),
           plgpu.SMEM((stages, _ROWS, head_dim), dtype, transforms=tiles)),
          *[plgpu.SMEM((_WGS, _ROWS, head_dim), dtype, transforms=tiles)] * bool(direct),
          *[plgpu.SMEM((_WGS, _ROWS, head_dim), jnp.float32,
                       transforms=swizzled_f32(head_dim))] * (direct is not True)),
      *bwd_dq.query_vectors((stages,), _ROWS, dims),
      plgpu.SMEM((2, _BLOCK_KV, _ROWS) if split_dq else (_BLOCK_KV, _ROWS), dtype,
                 transforms=tiles) if with_dq or interpret else None,
      plgpu.SMEM((_WGS, _ROWS, dq_cols), jnp.float32, transforms=swizzled_f32(dq_cols))
      if with_dq else None,
      plgpu.SMEM((_WGS, _ROWS, _ROWS), dtype, transforms=tiles)
      if interpret else None,
      plgpu.SMEM((_WGS, extras, _ROWS), jnp.int32) if extras else None,
      plgpu.SMEM((stages, extras, _ROWS), jnp.int32) if extras else None,
      plgpu.SMEM((_WGS, _ROWS, mma_width), jnp.bfloat16, transforms=narrow) if mma else None,
      plgpu.SMEM((stages, mma_width, _ROWS), jnp.bfloat16, transforms=narrow) if mma else None,
      plgpu.Barrier(num_arrivals=2 + _WGS * (1 + extras + int(mma))),
      plgpu.Barrier(num_arrivals=6 + extras + int(mma), num_barriers=stages),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_WGS),
      plgpu.Barrier(num_arrivals=_WGS) if pingpong else None,
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=2) if deferred else None,
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=2) if deferred else None,
      collective_axes="wg",
  )


# Gathered plans (neighborhoods): rowsum(dO ∘ O) taken in the caller's order and folded into
# dLSE, so O is not permuted into kernel order; False: O permuted (the earlier form).
FOLD_ROWSUM = True

# dQ (its own kernel) over window-anchored KV boxes where they cost less than the backward
# plan's map (`cost.window_dq_tile`): strided neighborhoods, whose shifted key grid
# (`ops._backward_plan`) holds only interior windows whole.
WINDOW_DQ = True


def _dq_window(cfg, plan: AttentionPlan, k, v, head_dim: int, segments: bool, scale: float,
               interpret):
  """The dQ kernel's window boxes for a gathered plan, (geometry, box groups, inputs) with
  the caller-order k/v views (`attention_bwd_dq.dq_launch`'s ``window``), or None: not with
  segment ids or padding masks, mask functions, head dims the kernels pad, or where dQ is
  fused into the dK/dV kernel. `MosaicGPUConfig.kv_windows`: True wherever they apply, None
  where they pay (`cost.window_dq_tile`), False never."""
  if not (WINDOW_DQ and cfg.mask_mma and cfg.kv_windows is not False and not segments
          and isinstance(plan.mask, masks.Neighborhood) and plan.mask_fn is None
          and _padded_head_dim(head_dim) == head_dim and not policy.wide(plan, head_dim)
          and plan.block_kv == _BLOCK_KV and policy.separate_dq(cfg, plan, head_dim)):
    return None
  box_ok = box_copies(cfg, interpret)
  tile = window_dq_tile(plan, force=cfg.kv_windows is True)
  if tile is None or not (interpret or (box_ok and _window_groups(tile))):
    return None
  inputs = window_dq_inputs(plan, tile, scale)
  if inputs is None:
    return None
  geometry = _Boxes(tuple(plan.kv_layout.spatial_shape), tile, ())
  box = _window_groups(tile) if box_ok else None
  view = _window_view if box is not None else _view
  return view(k, geometry), view(v, geometry), (geometry, box, inputs)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: AttentionPlan, scale: float,
             config, interpret, block_map=None, dq_window=None, softcap=None):
  """dq, dk, dv for `forward`'s arrays and plan (`MosaicGPUConfig.backward="triton"`: the
  Triton kernels). `block_map`: a runtime map (`block_map.from_selection`), whose work items
  are built on device (`work_items.runtime_items` for dK/dV; the dQ kernel reads the map's rows).
  `dq_window`: (k view, v view, window) of the dQ kernel's window boxes (`_dq_window`; set
  by the gathered plans' call into kernel order). `softcap`: logit soft-capping."""
  cfg = _config(config)
  runtime = block_map is not None
  wide = policy.wide(plan, q.shape[-1])
  # The Triton kernels where asked, where `policy.picks_mosaic` prefers them, and for plans made
  # with other blocks (attention(..., block_kv=64) at head_dim <= 128).
  if not policy.runs_plan(plan, q.shape[-1]):
    raise ValueError(
        f"backend='mosaic_gpu' trains plans of {_BLOCK_KV}-key blocks at head_dim <= "
        f"{_MAX_BACKWARD_HEAD_DIM} (this one: block_kv={plan.block_kv}, head_dim "
        f"{q.shape[-1]}), and the Triton backward it would take is unavailable "
        f"(`triton_attention.available`): leave block_kv unset")
  if (cfg.backward == "triton"
      or (cfg.backward is None and not policy.picks_mosaic(plan, q.shape[-1], q_seg is not None))
      or not policy.own_blocks(plan, q.shape[-1])):
    return triton_attention.backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan,
                                     scale, cfg.triton, interpret,
                                     **({"block_map": block_map} if runtime else {}),
                                     softcap=softcap)
  b, sq, h, d = q.shape
  why = unsupported(plan, d, q.dtype, q_seg is not None, scale)
  if why is not None:
    raise ValueError(f"backend='mosaic_gpu' backward does not support {why}")
  if plan.gathered:  # kernel order (the forward's TMA boxes are not needed here)
    ql, kl = plan.q_layout, plan.kv_layout
    rows = lambda x: kernel_order(x.transpose(0, 2, 1), ql).transpose(0, 2, 1)
    # rowsum(dO ∘ O) in the caller's order, folded into dLSE: O is not permuted (one
    # [batch, n, heads, head_dim] copy fewer; ``out=None`` below).
    if FOLD_ROWSUM or out is None:
      d_lse, out_k = -backward_delta(out, d_out, d_lse), None
    else:
      out_k = kernel_order(out, ql)
    dq, dk, dv = backward(
        kernel_order(q, ql), kernel_order(k, kl), kernel_order(v, kl), q_seg, kv_seg,
        out_k, rows(lse), kernel_order(d_out, ql), rows(d_lse),
        gathered(plan, False), scale, cfg, interpret,
        dq_window=_dq_window(cfg, plan, k, v, d, q_seg is not None, scale, interpret),
        softcap=softcap)
    return caller_order(dq, ql), caller_order(dk, kl), caller_order(dv, kl)
  dpad = _padded_head_dim(d)
  if cfg.backward_dq == "split" and dpad != 128 and not wide:
    raise ValueError(f"MosaicGPUConfig.backward_dq='split' needs a head_dim padded to 128 "
                     f"(97..128), got head_dim {d}: use 'own' or None")
  if dpad != d:
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, dpad - d)])
    dq, dk, dv = backward(pad(q), pad(k), pad(v), q_seg, kv_seg,
                          None if out is None else pad(out), lse, pad(d_out), d_lse, plan,
                          scale, cfg, interpret, block_map, softcap=softcap)
    return dq[..., :d], dk[..., :d], dv[..., :d]
  skv, hkv = k.shape[1], k.shape[2]
  bmap = walked_map(plan, block_map)
  n_q, n_kv = plan.q_layout.padded_len, plan.kv_layout.padded_len
  # delta = rowsum(dO ∘ O) - dLSE; lse in log2 units, +inf where the row saw no key (P = 0);
  # both padded to whole steps.
  # ``out=None``: the caller folded rowsum(dO ∘ O) into d_lse.
  delta = backward_delta(out, d_out, d_lse)
  delta = jnp.pad(delta, [(0, 0), (0, 0), (0, n_q - sq)])
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  lse2 = jnp.pad(lse2, [(0, 0), (0, 0), (0, n_q - sq)], constant_values=jnp.inf)
  # Every plan has at least one interval dim (non-interval masks: token validity); unions of
  # interval masks as intervals per term (`element.mask_vectors`).
  lo, hi, c, terms, mask_fn = mask_vectors(plan)
  lo, hi, c = (jnp.asarray(x, jnp.int32) for x in (lo, hi, c))
  dims = lo.shape[0]
  groups = h // hkv
  zeros = lambda n, heads, dtype=jnp.float32: jnp.zeros((b, n, heads, d), dtype)
  # A documents' map (rows shared by the heads, `block_map.from_segments`) keeps the static
  # map's Q lists or shortens them: the static map's work items cover it (an item's entries
  # clipped to its runtime list), one per KV block where the static map has that.
  static = plan.block_map
  whole = False
  shared_items = (runtime and bmap.shares_heads and SHARED_STATIC_ITEMS
                  and (static.num_q_blocks, static.num_kv_blocks, static.block_q,
                       static.block_kv) == (bmap.num_q_blocks, bmap.num_kv_blocks,
                                            bmap.block_q, bmap.block_kv))
  if shared_items:
    counts = jnp.stack([bmap.q_full_counts, bmap.q_counts], axis=-1).astype(jnp.int32)
    host_items, chunk = work_items.static_items(np.asarray(static.q_counts)), 0
    items = jnp.asarray(host_items)
    if not len(items):
      return (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
  elif runtime:
    counts = jnp.stack([bmap.q_full_counts, bmap.q_counts], axis=-1).astype(jnp.int32)
    whole = work_items.whole_lists(bmap, b, hkv, groups)
    if whole:  # one item per KV block, its whole lists: dK/dV stored (`RUNTIME_ITEMS`)
      chunk = bmap.max_q
      items = jnp.broadcast_to(
          jnp.stack([jnp.arange(bmap.num_kv_blocks, dtype=jnp.int32),
                     jnp.zeros(bmap.num_kv_blocks, jnp.int32)], axis=-1),
          (b, hkv, bmap.num_kv_blocks, 2))
    else:
      per_head = not bmap.shares_heads and work_items.head_items(groups, n_q, d,
                                                                 q.dtype.itemsize)
      chunk = (bmap.max_q if per_head and work_items.HEAD_CHUNK == "whole"
               else work_items.chunk_entries(policy.mean_entries(bmap)))
      q_counts = jnp.broadcast_to(bmap.q_counts, (b, h, bmap.num_kv_blocks))  # shared rows
      items = work_items.runtime_items(q_counts, groups, chunk, bmap.num_q_blocks * bmap.max_kv,
                                       per_head=per_head)
  else:
    counts = np.stack([np.asarray(bmap.q_full_counts), np.asarray(bmap.q_counts)], axis=1)
    host_items, chunk = work_items.static_items(counts[:, 1]), 0
    items = jnp.asarray(host_items)
    if not len(items):  # no query sees any key
      return (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
  extras = fwd._extras(plan, b, q_seg, kv_seg)
  # Neighborhoods: the forward's MMA bias on partial blocks, per kernel (static maps).
  mma = (backward_mma_inputs(plan, scale) if cfg.mask_mma and not runtime and not extras
         and plan.mask_fn is None and terms == 1 and not wide else None)
  mma_dq, mma_dkv = mma if mma is not None else (None, None)
  separate = policy.separate_dq(cfg, plan, d, bmap)
  stages = policy.slots(separate, d, mma)
  # One item per KV block (no chunked lists, static map): dK/dV stored, not reduce-added;
  # some lists cut: "mixed" (`MIXED_DKV`, `work_items.cut_slots`).
  direct = whole and DIRECT_DKV and not wide  # a runtime map's whole lists: stored
  if DIRECT_DKV and (not runtime or shared_items):
    slots, cut_blocks = work_items.cut_slots(host_items)
    direct = True if not len(cut_blocks) else "mixed" if MIXED_DKV and not wide else False
    if direct == "mixed":
      items = jnp.asarray(np.concatenate([host_items, slots[:, None]], axis=1))
  if wide:  # head_dim 160, 192 or 256: the role-split kernels (`attention_bwd_wide`)
    dq, dk, dv = bwd_wide.backward(
        items, functools.partial(work_items.item_lists, groups=groups, chunk=chunk,
                                 shared=bmap.shares_heads),
        counts, q, k, v, d_out, lse2, delta, lo, hi, c, extras, bmap=bmap, scale=scale,
        mask_fn=mask_fn, terms=terms, interpret=interpret, sub=plan.block_q // _ROWS,
        block_q=plan.block_q, direct=direct is True,
        fastest=(work_items.ITEMS_FASTEST, bwd_dq.Q_FASTEST), softcap=softcap)
    return dq[:, :sq], dk[:, :skv].astype(k.dtype), dv[:, :skv].astype(v.dtype)
  # A runtime map's whole lists (every KV block one item) stored by the kernel, blocks that no
  # query visits as zeros: dK/dV are its outputs, with no zero fill (`WRITTEN_RUNTIME`).
  zero_empty = WRITTEN_RUNTIME and whole and direct is True
  # Quarters of partial blocks that no pair may pass, skipped (static maps, dQ its own kernel).
  split = policy.split_dq(cfg, d) and not separate
  deferred = bool(DEFERRED_DQ) and split
  quarters = (policy.dead_quarters(cfg, plan, bmap)
              if (separate or (deferred and policy.FUSED_QUARTERS)) and not runtime else None)
  dq_quarters = quarters[0] if quarters is not None and QUARTERS_DQ and separate else None
  kernel = functools.partial(
      _kernel, head_dim=d, groups=groups, dims=dims, sub=plan.block_q // _ROWS,
      block_q=plan.block_q, stages=stages, scale=scale, dtype=q.dtype, interpret=bool(interpret),
      split_dq=split, mask_fn=mask_fn, terms=terms,
      segments=q_seg is not None, chunk=chunk,
      pingpong=(cfg.backward_pingpong or (DEFERRED_DQ == "pingpong" and split)) and not interpret,
      deferred=deferred,
      with_dq=not separate, direct=direct, segments_full=bmap.segments_full,
      shared=bmap.shares_heads, mma_width=0 if mma is None else mma_dkv[0].shape[1],
      quarters=quarters is not None, zero_empty=zero_empty, softcap=softcap)
  grid = bwd_dq.backward_grid(b, hkv, ("kv", items.shape[-2]), work_items.ITEMS_FASTEST)
  args = (items, jnp.asarray(bmap.q_ids, jnp.int32), jnp.asarray(counts, jnp.int32),
          q, k, v, d_out, lse2, delta, lo, hi, c, *extras,
          *([] if mma is None else [jnp.asarray(x) for x in mma_dkv]),
          *([] if quarters is None else [jnp.asarray(quarters[1])]))

  joint = JOINT_DQ and separate and dq_window is None  # window dQ reads other K/V arrays
  if joint:  # dQ's CTAs after the dK/dV items in one launch (`_joint`)
    dq_launch = bwd_dq.dq_launch(q, k, v, d_out, lse2, delta, lo, hi, c, extras, bmap=bmap,
                                 scale=scale, mask_fn=mask_fn, terms=terms,
                                 interpret=interpret, mma=mma_dq, quarters=dq_quarters,
                                 softcap=softcap)
    run = _joint(kernel, args, grid, dq_launch, interpret)
  else:  # the dK/dV kernel alone
    def run(refs, out_type):
      """The kernel over `args`, writing into the state `refs` (zero-filled buffers) and
      returning `out_type`; it takes its outputs before the state (dK/dV, then cut buffers)."""
      def ordered(*all_refs):
        ins, rest = all_refs[:len(args)], all_refs[len(args):]
        state, outputs = rest[:len(refs)], rest[len(refs):]
        if not separate and outputs:  # the fused dQ's buffer comes before dK/dV
          state, outputs = state[1:], (state[0], *outputs)
        kernel(*ins, *outputs, *state)
      return pl.kernel(ordered, out_type=out_type, mesh=bwd_dq.grid_mesh(grid),
                       compiler_params=plgpu.CompilerParams(approx_math=True),
                       interpret=interpret_params(interpret),
                       name="sparse_attention_bwd")(*args, *refs)

  # Every KV block stored by one item (``direct``, or ``mixed`` with the cut blocks' rows
  # scattered in below; static maps, every KV block visited): dK/dV are the kernel's outputs,
  # with no zero fill (`WRITTEN_DKV`; H200, the causal window at S=32768: 80 us of 4.1 ms).
  # Zero-filled state the kernel writes into: float32 reduce-add targets (fused dQ, the cut
  # blocks' buffers) and dK/dV where some KV block has no single storing item.
  written = zero_empty or (
      WRITTEN_DKV and separate and direct in (True, "mixed") and not runtime
      and len(np.unique(host_items[:, 0])) == n_kv // _BLOCK_KV)
  outs = ((jax.ShapeDtypeStruct((b, n_q, h, d), q.dtype),) * joint
          + (jax.ShapeDtypeStruct((b, n_kv, hkv, d), k.dtype),) * 2 * written)
  state = () if separate else (zeros(n_q, h),)
  if not written:
    state += tuple(zeros(n_kv, hkv, x.dtype if direct else jnp.float32) for x in (k, v))
  if direct == "mixed":
    state += (zeros(len(cut_blocks) * _BLOCK_KV, hkv),) * 2
  if not state:
    results = run((), outs)
  else:  # outputs kept in state buffers (written whole: XLA drops their zeros)
    def body(refs):
      values = run(refs[:len(state)], outs)
      for ref, value in zip(refs[len(state):], values if outs else ()):
        ref[...] = value
    final = pl.run_state(body)((*state, *(jnp.zeros(o.shape, o.dtype) for o in outs)))
    n = len(final) - len(outs)
    state, results = tuple(final[:n]), tuple(final[n:])
  # results: (dq if joint) + (dk, dv if written); state: (fused dq) + (dk, dv if not
  # written) + (the cut blocks' dk, dv if mixed)
  if not separate:
    dq, state = state[0], state[1:]
  elif joint:
    dq, results = results[0], results[1:]
  dk, dv = results if written else state[:2]
  cut = state[-2:] if direct == "mixed" else ()
  if joint:
    dq = dq[:, :sq]
  elif separate:
    k_dq, v_dq, window = dq_window if dq_window is not None else (k, v, None)
    dq = bwd_dq.dq(q, k_dq, v_dq, d_out, lse2, delta, lo, hi, c, extras, bmap=bmap,
                   scale=scale, mask_fn=mask_fn, terms=terms, interpret=interpret, mma=mma_dq,
                   quarters=dq_quarters, window=window, softcap=softcap)[:, :sq]
  else:
    dq = (dq[:, :sq] * scale).astype(q.dtype)
  if cut:  # the cut blocks' rows from their float32 buffers
    rows = (cut_blocks[:, None] * _BLOCK_KV + np.arange(_BLOCK_KV)).reshape(-1)
    dk, dv = (x.at[:, rows].set(y.astype(x.dtype)) for x, y in zip((dk, dv), cut))
  return dq, dk[:, :skv].astype(k.dtype), dv[:, :skv].astype(v.dtype)


# dQ (its own kernel) in the dK/dV kernel's launch: one grid of the dK/dV work items, then
# the dQ kernel's CTAs, so that the many short dQ CTAs fill the SMs that the dK/dV kernel's
# last wave of long items leaves idle (the LM layer: 568 items, 4.3 waves of ~46 steps),
# and one launch fewer. False: two launches.
JOINT_DQ = True


def _joint(dkv_kernel, dkv_args, dkv_grid, dq_launch, interpret):
  """``run(refs, out_type)`` of one launch of both backward kernels (`JOINT_DQ`): program
  ids below the dK/dV grid's size run `dkv_kernel` (over `dkv_args`, its grid `dkv_grid`),
  the rest the dQ kernel of `dq_launch` (`attention_bwd_dq.dq_launch`), whose shared arrays
  are the dK/dV kernel's after its three map arrays. ``refs``: the dK/dV kernel's state
  buffers (written in place, or none); ``out_type``: dq's, then dk/dv's where the dK/dV
  kernel writes them as outputs."""
  dq_kernel, (map_args, dq_args), dq_grid, _ = dq_launch
  shared = slice(3, 3 + len(dq_args))  # q, k, v, dO, lse2, delta, lo, hi, c, extras
  assert all(x is y for x, y in zip(dkv_args[shared], dq_args))
  n_dkv = math.prod(n for _, n in dkv_grid)
  n_dq = math.prod(n for _, n in dq_grid)

  def kernel(*refs, n_state: int):
    dkv_in, refs = refs[:len(dkv_args)], refs[len(dkv_args):]
    maps, refs = refs[:len(map_args)], refs[len(map_args):]
    # the state (the dK/dV kernel's buffers), then the outputs: dq and dK/dV's
    state, (dq_out, *dkv_out) = refs[:n_state], refs[n_state:]
    dkv_out = (*dkv_out, *state)
    pid = lax.axis_index("cta")

    @pl.when(pid < n_dkv)
    def _():
      at = bwd_dq.grid_indices(pid, dkv_grid)
      dkv_kernel(*dkv_in, *dkv_out, cta=(at["kv"], at["head"], at["batch"]))

    @pl.when(pid >= n_dkv)
    def _():
      at = bwd_dq.grid_indices(pid - n_dkv, dq_grid)
      dq_kernel(*maps[:3], *dkv_in[shared], *maps[3:], dq_out,
                cta=(at["q"], at["head"], at["batch"]))

  def run(refs, out_type):
    return pl.kernel(functools.partial(kernel, n_state=len(refs)), out_type=out_type,
                     mesh=bwd_dq.grid_mesh((("cta", n_dkv + n_dq),)),
                     compiler_params=plgpu.CompilerParams(approx_math=True),
                     interpret=interpret_params(interpret),
                     name="sparse_attention_bwd_joint")(*dkv_args, *map_args, *refs)

  return run
