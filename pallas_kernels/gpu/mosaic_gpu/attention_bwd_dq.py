"""dQ of the Hopper backward as its own kernel, over the forward block map (FlashAttention-2's
split, as the Triton kernels and tokamax's Hopper VJP do): no float32 reductions.

A CTA owns a 128-row Q block of one query head and batch element: the memory warpgroup loads
its Q, dO, log-sum-exp, delta and query intervals once, then streams the block's KV list
(full blocks, then partial ones) through a ring of K/V slots; each of the two compute
warpgroups owns 64 query rows and keeps their dQ in registers. Per KV block, in two halves of
64 keys (so that S, dP and dQ fit in registers together):

    S = Q Kᵀ, dP = dO Vᵀ                   (two wgmmas, one wait)
    P = exp2(S·scale·log2 e − lse₂)         (masked: 0 outside each query's intervals)
    dS = P ∘ (dP − delta)
    dQ += dS K                              (dS from registers)

and dQ·scale is stored once at the end. Masks are the fused kernel's, rows and columns
swapped (`attention_bwd`): for neighborhoods the forward's MMA bias (the Q block's one-hot
coordinates by the step's test matrix over 64 keys), else the element test of interval dims,
a mask function on kernel positions, segment ids. dK and dV come from `attention_bwd._kernel` with its dQ turned off.

Strided neighborhoods read K/V as the forward's window-anchored boxes instead of the
backward plan's blocks (`attention_bwd.WINDOW_DQ`): boxes of the caller's key grid placed on
each query tile's window, all full where the plan's shifted grid leaves edge windows
partial (`tables.window_dq_inputs`).

Interpret mode (CPU) has no register operands and no accumulation into a live accumulator:
there dS goes through shared memory and each product lands in a fresh accumulator.
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

from .boxes import _Boxes, box_slots, copy_box
from .config import _COMPUTE_WGS as _WGS, _ROWS, interpret_params, swizzle_columns, swizzled
from .element import mask_intervals

LOG2E = math.log2(math.e)
_BLOCK_Q = _WGS * _ROWS  # a CTA's query rows: 64 per compute warpgroup
_BLOCK_KV = 128
KV_SUB = _ROWS  # keys per S tile: 64 (two per KV block) or 128


def mma_add(acc, a, b):
  """acc + a @ b through a fresh accumulator: interpret mode's form of accumulating wgmmas
  (it has no accumulation into a live accumulator); both backward kernels use it."""
  def run(r):
    plgpu.wgmma(r, a, b)
    return r[...]
  return acc + pl.run_scoped(run, plgpu.ACC(acc.shape, jnp.float32))


# The grid's last (fastest) axis: True, Q blocks (CTAs that run at once share a head's K/V
# blocks); False, batch. Measured with `work_items.ITEMS_FASTEST` (3-4% on dense and
# causal, 7% on 3-D NA).
Q_FASTEST = True
STAGES = 2  # K/V slots of the memory warpgroup's ring



def tile_vectors(tile):
  """Broadcasts of shared-memory vectors to a WGMMA-layout tile: ``rows(ref)`` puts a
  [tile[0]] vector down the rows, ``cols(ref)`` a [tile[1]] one across the columns."""
  rows = lambda ref: lax.broadcast_in_dim(
      plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1)), tile, [0])
  cols = lambda ref: lax.broadcast_in_dim(
      plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0)), tile, [1])
  return rows, cols


def row_list(counts_ref, ids_ref, batch, head, q_block, runtime: bool, shared: bool):
  """A Q block's row of the forward map in a dQ kernel: (full entries, all entries, entry →
  KV block). Runtime maps have rows per (batch, head), or per batch (``shared`` by every
  head); static maps one per Q block."""
  if runtime:
    row_head = 0 if shared else head
    count = lambda c: counts_ref[batch, row_head, q_block, c]
    kv_block = lambda e: ids_ref[batch, row_head, q_block, e]
  else:
    count = lambda c: counts_ref[q_block, c]
    kv_block = lambda e: ids_ref[q_block, e]
  return count(0), count(1), kv_block


def item_steps(full, entries, sub: int, groups: int):
  """A dK/dV work item's steps of 64 query rows, query head after query head of the group:
  per head j its full steps n_full[j] and all steps n_all[j] (entries × `sub` steps each;
  full blocks first, then partial ones), head j's first step bases[j], and the total."""
  n_full = [f * sub for f in full]
  n_all = [e * sub for e in entries]
  bases = [sum(n_all[:j], jnp.int32(0)) for j in range(groups + 1)]
  return n_full, n_all, bases, bases[groups]


def step_rows(q_block, j, r, sub: int, block_q: int):
  """First query row of step r of query head j's list in a dK/dV work item: its entry
  r // sub (`q_block(j, entry)`, a Q block) and that block's (r % sub)-th 64-row part."""
  return q_block(j, lax.div(r, sub)) * block_q + lax.rem(r, sub) * _ROWS


def query_vectors(lead: tuple[int, ...], rows: int, dims: int):
  """Shared memory for the vectors of `rows` query rows, each with leading dims `lead` (the
  dK/dV kernels' step slots): lse₂ and delta (float32), then the intervals lo and hi per mask
  dim (int32)."""
  return (plgpu.SMEM((*lead, rows), jnp.float32), plgpu.SMEM((*lead, rows), jnp.float32),
          plgpu.SMEM((*lead, dims, rows), jnp.int32), plgpu.SMEM((*lead, dims, rows), jnp.int32))


def key_slots(stages: int, rows: int, head_dim: int, dims: int, dtype):
  """Shared memory for the dQ kernels' KV steps: K and V [stages, rows, head_dim] (swizzled
  for wgmma), key coordinates [stages, dims, rows]."""
  return (plgpu.SMEM((stages, rows, head_dim), dtype, transforms=swizzled(head_dim)),
          plgpu.SMEM((stages, rows, head_dim), dtype, transforms=swizzled(head_dim)),
          plgpu.SMEM((stages, dims, rows), jnp.int32))


def free_slot(free, t, stages: int):
  """Step t's slot of a ring of `stages`, once the compute warpgroups released its last use
  (the memory warpgroup's wait before it loads step t)."""
  slot = lax.rem(t, stages)

  @pl.when(t >= stages)
  def _():
    plgpu.barrier_wait(free.at[slot])

  return slot


def rendezvous(turn):
  """The compute warpgroups meet at barrier ``turn`` (one arrival each)."""
  plgpu.barrier_arrive(turn)
  plgpu.barrier_wait(turn)


def load_query_rows(gmem, smem, batch, rows, head, bar):
  """A backward step's query-side TMA copies, each arriving on ``bar``: ``gmem`` is (q, do,
  lse, delta, lo, hi, qx) with q/do [b, n, h, d], lse/delta [b, h, n], lo/hi [dims, n] and
  segment ids qx [b, 1, n]; ``smem`` their destinations. None (q or qx): not loaded here."""
  q, do, lse, delta, lo, hi, qx = gmem
  srcs = (None if q is None else q.at[batch, rows, head], do.at[batch, rows, head],
          lse.at[batch, head, rows], delta.at[batch, head, rows], lo.at[:, rows],
          hi.at[:, rows], None if qx is None else qx.at[batch, :, rows])
  for src, dst in zip(srcs, smem):
    if src is not None:
      plgpu.copy_gmem_to_smem(src, dst, bar)


def load_key_rows(gmem, smem, batch, keys, kv_head, bar):
  """A KV block's TMA copies, each arriving on ``bar``: ``gmem`` is (k, v, c, kx) with k/v
  [b, n, hkv, d], key coordinates c [dims, n] and segment ids kx [b, 1, n] (None: none);
  ``smem`` their destinations."""
  k, v, c, kx = gmem
  srcs = (k.at[batch, keys, kv_head], v.at[batch, keys, kv_head], c.at[:, keys],
          None if kx is None else kx.at[batch, :, keys])
  for src, dst in zip(srcs, smem):
    if src is not None:
      plgpu.copy_gmem_to_smem(src, dst, bar)


def backward_grid(batch: int, heads: int, work: tuple[str, int], work_fastest: bool):
  """A backward kernel's grid axes, (name, size) each: "batch", "head" and the work axis.
  Pallas runs the grid's last axis fastest: the work axis there with ``work_fastest``, else
  batch."""
  grid = (("batch", batch), ("head", heads), work)
  return grid if work_fastest else grid[::-1]


def grid_mesh(grid) -> plgpu.Mesh:
  """A backward kernel's mesh over `grid` ((name, size) pairs) and the warpgroups."""
  return plgpu.Mesh(grid=tuple(n for _, n in grid), grid_names=tuple(a for a, _ in grid),
                    num_threads=_WGS + 1, thread_name="wg")


def backward_mesh(batch: int, heads: int, work: tuple[str, int], work_fastest: bool):
  """A backward kernel's mesh: its `backward_grid` and the warpgroups."""
  return grid_mesh(backward_grid(batch, heads, work, work_fastest))


def grid_indices(pid, grid) -> dict:
  """The index along each axis of `grid` ((name, size) pairs, the last fastest) of the
  flat program id `pid`."""
  out = {}
  for name, size in reversed(grid):
    out[name], pid = lax.rem(pid, size), lax.div(pid, size)
  return out


def _kernel(order_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
            lo_ref, hi_ref, c_ref, *refs, head_dim: int, groups: int, dims: int, stages: int,
            scale: float, dtype, interpret: bool, mask_fn=None, segments: bool = False,
            runtime: bool = False, kv_sub: int = _ROWS, segments_full: bool = False,
            shared: bool = False, mma_width: int = 0, terms: int = 1, cta=None,
            quarters: bool = False, window: _Boxes | None = None, box: tuple | None = None,
            softcap: float | None = None):
  """CTA (q block in visiting order, query head, batch): the grid's axes "q", "head" and "batch", or
  ``cta`` (their indices in a joint launch, `attention_bwd.JOINT_DQ`). order [n_q blocks]; ids [n_q
  blocks, max kv], counts [n_q blocks, 2] (full, all): the forward map (a runtime map: [b, h, ...]
  rows per batch element and query head). q/do [b, n_q, h, d]; lse₂ (log2 units, +inf where no key
  was seen) and delta [b, h, n_q]; lo/hi [dims, n_q], c [dims, n_kv] (``terms`` > 1: a union,
  `plan.any_term`); dq [b, n_q, h, d] (written, not accumulated). MMA-bias masks
  (``mma_width`` > 0, neighborhoods: `tables.backward_mma_inputs`): onehot [128, W] of the Q block's
  coordinates, tables [n, W, 64] and table_ids [n_q blocks, 2 * max kv] (entry e's halves at 2e, 2e
  + 1) come before dq, and replace the interval test of partial blocks (``kv_sub`` 64).
  ``quarters``: the last array before dq is `tables.live_quarters`' forward map bits [n_q
  blocks, max kv]; a warpgroup skips the 64-key halves of partial blocks that none of its
  rows may see (``kv_sub`` 64).

  Window-anchored KV boxes (``window``: the K/V view's geometry and box tile,
  `tables.window_dq_inputs`): ids are the steps' box origins [n_q blocks, steps, view dims]
  and k/v the caller's [b, *spatial, hkv, ...] views; with ``box`` (`_window_groups`, the
  GPU) `_window_view`s copied per swizzle group of columns into a slot [parts, *box, 8, w]
  (scores sum one wgmma per part, dQ accumulates in w-column parts), else one copy per row
  of the box into a [128, head_dim] slot (interpret mode)."""
  mma = mma_width > 0
  quarters_ref = None
  if quarters:
    *refs, quarters_ref, dq_ref = refs
    refs = (*refs, dq_ref)
  if mma:
    onehot_ref, tables_ref, table_ids_ref, dq_ref = refs
  elif segments:
    qx_ref, kx_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  q_index, head, batch = cta or [lax.axis_index(a) for a in ("q", "head", "batch")]
  q_block = order_ref[q_index]
  kv_head = lax.div(head, groups)
  n_full, n_all, kv_block = row_list(counts_ref, ids_ref, batch, head, q_block, runtime,
                                     shared)
  q0 = q_block * _BLOCK_Q
  qk_scale = scale * LOG2E
  # K/V slots of window box copies: one per swizzle group of columns (`attention_fwd`'s)
  parts = head_dim // swizzle_columns(head_dim) if box is not None else 1
  width = head_dim // parts

  def body(q_smem, do_smem, k_smem, v_smem, c_smem, lse_smem, delta_smem, lo_smem, hi_smem,
           qx_smem, kx_smem, ds_smem, onehot_smem, table_smem, q_bar, kv_bar, kv_free):
    wg = lax.axis_index("wg")
    # Window boxes start anywhere along the last dim: the TMA writes through an untiled view
    # of the same bytes (`k_raw`), the wgmmas read the tiled one (as `attention_fwd`).
    k_raw, v_raw = k_smem, v_smem
    if box is not None:
      (k_smem, k_raw), (v_smem, v_raw) = k_smem, v_smem

    def key_part(smem, slot, keys, i):
      """Keys `keys` of a K/V slot, columns [w i, w i + w) of a box slot (else all)."""
      if box is None:
        return smem.at[slot, keys]
      return smem.at[slot, i].reshape(_BLOCK_KV, width).at[keys]

    def cols_of(ref, i):
      """Columns [w i, w i + w) of a [rows, head_dim] ref (all of it with one part)."""
      return ref if parts == 1 else ref.at[:, pl.ds(i * width, width)]

    @pl.when(wg < _WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      own = pl.ds(wg * _ROWS, _ROWS)
      plgpu.barrier_wait(q_bar)
      tile = (_ROWS, kv_sub)
      rows, cols = tile_vectors(tile)
      lse, delta = rows(lse_smem.at[own]), rows(delta_smem.at[own])
      lo = [rows(lo_smem.at[d, own]) for d in range(dims)]
      hi = [rows(hi_smem.at[d, own]) for d in range(dims)]
      q_x = rows(qx_smem.at[0, own]) if segments else None

      def step(e, dq, masked: bool):
        slot = lax.rem(e, stages)
        plgpu.barrier_wait(kv_bar.at[slot])
        kv0 = None if window is not None else kv_block(e) * _BLOCK_KV
        bits = quarters_ref[q_block, e] if quarters_ref is not None and masked else None
        for part in range(_BLOCK_KV // kv_sub):
          if bits is None:
            dq = keys_step(dq, slot, kv0, part, masked)
          else:  # a 64-key half that some of my rows may see (`tables.live_quarters`)
            live = lax.shift_right_logical(bits, 2 * wg + part) & 1
            dq = lax.cond(live != 0, functools.partial(keys_step, slot=slot, kv0=kv0,
                                                       part=part, masked=masked),
                          lambda x: x, dq)
        plgpu.barrier_arrive(kv_free.at[slot])
        return dq

      def keys_step(dq, slot, kv0, part: int, masked: bool):
        """dQ += dS K over the step's `part`-th `kv_sub` keys."""
        keys = pl.ds(part * kv_sub, kv_sub)
        k_half = [key_part(k_smem, slot, keys, i) for i in range(parts)]

        def sdp(refs):
          s_ref, dp_ref = refs
          if masked and mma:  # the bias first: onehot [64, W] @ test [W, 64 keys]
            plgpu.wgmma(s_ref, onehot_smem.at[wg], table_smem.at[slot, part])
          for i in range(parts):
            plgpu.wgmma(s_ref, cols_of(q_smem.at[own], i), k_half[i].transpose((1, 0)))
          for i in range(parts):
            plgpu.wgmma(dp_ref, cols_of(do_smem.at[own], i),
                        key_part(v_smem, slot, keys, i).transpose((1, 0)))
          return s_ref[...], dp_ref[...]

        s, dp = pl.run_scoped(sdp, (plgpu.ACC(tile, jnp.float32),) * 2)
        s = capped2(s * qk_scale, softcap, floor=masked and mma)  # log2 units, before masks
        p = jnp.exp2(s - lse)
        if masked and not mma:
          def in_dim(d):
            c = cols(c_smem.at[slot, d, keys])
            return (c >= lo[d]) & (c <= hi[d])
          p = mask_intervals(p, in_dim, dims, terms)
          if mask_fn is not None:
            iota = lambda dim: plgpu.layout_cast(
                lax.broadcasted_iota(jnp.int32, tile, dim), plgpu.Layout.WGMMA)
            p = jnp.where(mask_fn(q0 + wg * _ROWS + iota(0), kv0 + part * kv_sub + iota(1)),
                          p, 0.0)
        if segments and (masked or not segments_full):
          p = jnp.where(cols(kx_smem.at[slot, 0, keys]) == q_x, p, 0.0)
        ds = p * (dp - delta)
        if softcap is not None:  # through the cap
          ds = ds * slope2(s, softcap)
        ds = ds.astype(dtype)
        if interpret:
          ds_smem.at[wg][...] = ds
          plgpu.commit_smem()
          return tuple(mma_add(a, ds_smem.at[wg], k) for a, k in zip(dq, k_half))

        def product(acc_refs):  # dQ (its column parts) += dS K
          for i, acc_ref in enumerate(acc_refs):
            plgpu.wgmma(acc_ref, ds, key_part(k_smem, slot, keys, i))
        return pl.run_state(product)(tuple(plgpu.ACC.init(a) for a in dq))

      dq = tuple(plgpu.layout_cast(jnp.zeros((_ROWS, width), jnp.float32), plgpu.Layout.WGMMA)
                 for _ in range(parts))
      dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), dq)
      # Q's rows are free once the last products are waited: dQ leaves through them.
      for i, a in enumerate(dq):
        cols_of(q_smem.at[own], i)[...] = (a * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[own], dq_ref.at[batch, pl.ds(q0 + wg * _ROWS, _ROWS),
                                                         head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      load_query_rows(
          (q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, qx_ref if segments else None),
          (q_smem, do_smem, lse_smem, delta_smem, lo_smem, hi_smem, qx_smem), batch,
          pl.ds(q0, _BLOCK_Q), head, q_bar)
      if mma:
        for w in range(_WGS):
          plgpu.copy_gmem_to_smem(onehot_ref.at[pl.ds(w * _ROWS, _ROWS)], onehot_smem.at[w],
                                  q_bar)

      @pl.loop(0, n_all)
      def _load(e):
        slot = free_slot(kv_free, e, stages)

        bar = kv_bar.at[slot]
        if window is not None:  # the step's box at its origin, K then V
          origin = [ids_ref[q_block, e, d] for d in range(len(window.tile))]
          for src, dst in ((k_ref, k_raw), (v_ref, v_raw)):
            copy_box(src, dst, slot, batch, kv_head, origin, window, parts, box, bar)
        else:
          keys = pl.ds(kv_block(e) * _BLOCK_KV, _BLOCK_KV)
          load_key_rows((k_ref, v_ref, c_ref, kx_ref if segments else None),
                        (k_smem.at[slot], v_smem.at[slot], c_smem.at[slot],
                         kx_smem.at[slot] if segments else None), batch, keys, kv_head, bar)
        if mma:  # full entries load table 0 too: a fixed arrival count
          for part in range(2):
            plgpu.copy_gmem_to_smem(tables_ref.at[table_ids_ref[q_block, 2 * e + part]],
                                    table_smem.at[slot, part], bar)

      # Observe each slot's last release before the barriers are freed.
      for s in range(stages):
        pl.when(s < n_all)(lambda: plgpu.barrier_wait(kv_free.at[s]))

  extras = int(segments)
  # wgmma operands with K = W: (8, W) tiles, swizzle 2W bytes (as the forward's bias).
  narrow = ((plgpu.TilingTransform((8, mma_width)), plgpu.SwizzleTransform(2 * mma_width))
            if mma else None)
  tiles = swizzled(head_dim)  # the 16-bit tiles that meet a head_dim operand
  k_slots, v_slots, c_slots = key_slots(stages, _BLOCK_KV, head_dim, dims, dtype)
  # A step's K/V copies: one per row of the key block, of a box's rows, or per column part
  key_copies = 1 if window is None else parts if box is not None else math.prod(
      window.tile[:-1])
  if box is not None:  # each part folds to [128, w]; the copies write the raw view
    k_slots = v_slots = box_slots(stages, parts, box, width, dtype, window.tile)
  pl.run_scoped(
      body,
      plgpu.SMEM((_BLOCK_Q, head_dim), dtype, transforms=tiles),
      plgpu.SMEM((_BLOCK_Q, head_dim), dtype, transforms=tiles),
      k_slots, v_slots, c_slots,
      *query_vectors((), _BLOCK_Q, dims),
      plgpu.SMEM((extras, _BLOCK_Q), jnp.int32) if extras else None,
      plgpu.SMEM((stages, extras, _BLOCK_KV), jnp.int32) if extras else None,
      plgpu.SMEM((_WGS, _ROWS, kv_sub), dtype, transforms=tiles) if interpret else None,
      plgpu.SMEM((_WGS, _ROWS, mma_width), jnp.bfloat16, transforms=narrow) if mma else None,
      plgpu.SMEM((stages, 2, mma_width, _ROWS), jnp.bfloat16, transforms=narrow)
      if mma else None,
      plgpu.Barrier(num_arrivals=6 + extras + (_WGS if mma else 0)),
      plgpu.Barrier(num_arrivals=2 * key_copies + (window is None) + extras + (2 if mma else 0),
                    num_barriers=stages),
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),
      collective_axes="wg",
  )


def dq(q, k, v, d_out, lse2, delta, *rest, interpret: bool, **kw):
  """dQ [b, n_q, h, d] (n_q: the plan's padded length, a multiple of 128) from the backward's
  padded inputs (`attention_bwd.backward`); the arguments are `dq_launch`'s."""
  kernel, (map_args, args), grid, out_type = dq_launch(q, k, v, d_out, lse2, delta, *rest,
                                                       interpret=interpret, **kw)
  return pl.kernel(
      kernel, out_type=out_type, mesh=grid_mesh(grid),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret_params(interpret), name="sparse_attention_bwd_dq",
  )(*map_args[:3], *args, *map_args[3:])


def dq_launch(q, k, v, d_out, lse2, delta, lo, hi, c, extras, *, bmap, scale: float, mask_fn,
              interpret: bool, kv_sub: int | None = None, mma=None, terms: int = 1,
              quarters=None, window=None, softcap=None):
  """The dQ kernel's launch: (kernel, (map arrays, arrays it shares with the dK/dV kernel),
  grid, out_type); the kernel's inputs are the map's first three arrays, the shared ones,
  then the map's others (its MMA-bias inputs). From the backward's padded inputs: lse₂ and
  delta [b, h, n_q], intervals lo/hi [dims, n_q] and key coordinates c [dims, n_kv]
  (``terms`` of a union), `extras` the segment-id vectors (`attention_fwd._extras`) or [];
  `bmap` the forward block map (128-row Q blocks, 128-key KV blocks), static or runtime;
  `mma` the dQ kernel's MMA-bias inputs (onehot, tables, table_ids;
  `tables.backward_mma_inputs`) or None; `quarters` the forward map's bits of
  `tables.live_quarters` (static maps; 64-key steps) or None. `window`: window-anchored KV
  boxes instead of the map's blocks, (geometry `_Boxes` of the K/V view, its box groups or
  None, `tables.window_dq_inputs`), with k and v the caller's views (`_window_view` with box
  groups, else `_view`). `softcap`: logit soft-capping (`softcap.capped2`, dS times its
  slope)."""
  box = None
  if window is not None:
    window, box, (origins, counts_w, onehot, tables, table_ids) = window
    mma, quarters = (onehot, tables, table_ids), None
  if mma is not None:
    kv_sub = _ROWS
  kv_sub = kv_sub or KV_SUB
  if kv_sub != _ROWS or bmap.is_runtime:
    quarters = None
  b, _, h, d = q.shape
  n_q = lse2.shape[-1]
  runtime = bmap.is_runtime
  if window is not None:
    counts = counts_w
  elif runtime:
    counts = jnp.stack([bmap.kv_full_counts, bmap.kv_counts], axis=-1)
  else:
    counts = np.stack([np.asarray(bmap.kv_full_counts), np.asarray(bmap.kv_counts)], axis=1)
  if runtime:
    order = jnp.arange(bmap.num_q_blocks, dtype=jnp.int32)
  else:  # longest lists first, so that short ones fill the tail (last Q block first, as the
    # dK/dV items, did no better: docs/experiments/h200-2026-12-03-dq-order.json)
    order = jnp.asarray(np.argsort(-counts[:, 1], kind="stable"), jnp.int32)
  hkv = k.shape[-3] if box is not None else k.shape[-2]  # a window box view: [.., hkv, parts, w]
  kernel = functools.partial(
      _kernel, head_dim=d, groups=h // hkv, dims=lo.shape[0], stages=STAGES, scale=scale,
      dtype=q.dtype, interpret=bool(interpret), mask_fn=mask_fn, segments=bool(extras),
      runtime=runtime, kv_sub=kv_sub,
      segments_full=bmap.segments_full, shared=bmap.shares_heads,
      mma_width=0 if mma is None else mma[0].shape[1], terms=terms,
      quarters=quarters is not None, window=window, box=box, softcap=softcap)
  grid = backward_grid(b, h, ("q", bmap.num_q_blocks), Q_FASTEST)
  ids = bmap.kv_ids if window is None else origins
  map_args = (order, jnp.asarray(ids, jnp.int32), jnp.asarray(counts, jnp.int32),
              *([] if mma is None else [jnp.asarray(x) for x in mma]),
              *([] if quarters is None else [jnp.asarray(quarters, jnp.int32)]))
  return (kernel, (map_args, (q, k, v, d_out, lse2, delta, lo, hi, c, *extras)), grid,
          jax.ShapeDtypeStruct((b, n_q, h, d), q.dtype))
