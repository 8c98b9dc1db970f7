"""Block-sparse flash attention forward for Hopper in Pallas Mosaic GPU ("mosaic_gpu").

FlashAttention-3 structure over a block map. A work item is (Q block of 128 rows, head,
batch); a CTA runs one item, or (persistent) a static share of them, with three
warpgroups. Two compute warpgroups own 64 query rows each and take turns on the tensor
cores (a shared "turn" barrier: one runs QKᵀ while the other runs its softmax); the third is
the memory warpgroup, which loads the item's Q tile, walks the row's visited KV blocks
(``kv_ids``) and TMA-loads K, V and the step's mask data into a ring of shared-memory
slots that runs on across items. Q blocks go longest row first. With per-warpgroup lists
(`MosaicGPUConfig.split`, `_split_inputs`) each compute warpgroup walks the block map of its
own 64 rows, and the memory warpgroup loads the union of the two lists once.

Tiles are TMA boxes in the caller's layout: for neighborhood attention (gathered plans) a Q
block is a spatial tile, e.g. ``q[b, y:y+8, x:x+16, h, :]``, copied straight from
``[batch, *spatial, heads, head_dim]`` (no permuted copies, no index vectors); the edge of
the last spatial dim is the TMA's out-of-bounds handling (zero fill on load, clipped on
store), and tiles must divide the leading spatial dims (`_box_layout`). Plans in
kernel order (1-D sequences, `tiling=`) are the 1-D case of the same. A K/V tile is one copy
per swizzle group of head_dim (64 columns; 32 or 16 where head_dim is no multiple of 64,
whose tiles take a 64- or 32-byte swizzle: `config.swizzle_columns`; box copies,
`_box_groups`) where the TMA's 5 strided dims allow,
else one copy per row of its last dim; Q tiles (once per item) copy per row. KV boxes may
also sit on each query tile's window instead of a fixed grid (`MosaicGPUConfig.kv_windows`,
`_window_inputs`): strided windows (NATTEN centres them on their stride group) and odd
kernels start off the grid, and anchored boxes cover them with fewer, fuller blocks.

Full blocks run with no mask arithmetic. Partial blocks of neighborhoods get the MMA bias
of the Triton kernels as one more wgmma into the score accumulator (a one-hot of the
warpgroup's query coordinates times the step's test matrix, read from deduplicated host
tables, TMA-loaded with K); other interval masks test every element against the per-row
intervals ``[lo, hi]`` of each mask dimension (loaded once per warpgroup) and the block's
key coordinates (loaded with K); a mask function runs on the kernel positions of partial
blocks, and segment ids (vectors loaded beside the intervals, `_extras`) are compared on
every block. The log-sum-exp (natural log, ``[batch, heads, n_q]``) is what the backward
(`attention_bwd.py`, or the Triton kernels) reads.
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

from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.merge import join_sink
from jax_sparse_attn.plan import AttentionPlan, gathered, walked_map
from jax_sparse_attn.softcap import capped2

from .. import mma_masks
from .config import _COMPUTE_WGS, _ROWS, _config, _padded_head_dim, unsupported
from .config import box_copies, interpret_params, swizzle_columns, swizzled
from .element import mask_intervals, mask_vectors
from .boxes import (_Boxes, _box_groups, _box_layout, _box_view, _boxes, _half_tile, _view,
                    _window_groups, _window_view, box_slots, caller_order, copy_box,
                    kernel_order)
from .tables import _mma_inputs
from .cost import split_lists, window_lists
from .schedule import _SMEM_LIMIT, _order, _persistent_default, _programs, _smem_bytes, _stages

# Segment ids and padding masks of neighborhoods on the box path: Q/K/V read as TMA boxes of
# the caller's layout, the segment vectors per kernel position (`ops._kernel_segments`)
# loaded beside the intervals. False: Q/K/V permuted into kernel order first (the earlier
# form, kept while GPU interpret mode hung on this path: XLA:CPU's concurrency-optimized
# scheduler, tests/conftest.py).
BOX_SEGMENTS = True

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# How partial blocks apply their element tests (interval dims, mask function, segment ids):
# "each" masks the scores after every test, "and" once with the tests' AND; None: "each"
# where segment ids are tested, else "and". H200, LM layer forward (causal & (window 512 |
# 4 sinks), S=8192 B=2 H=16/4; docs/experiments/h200-2026-11-29-lm-forward.json): with
# documents 0.28 ms "each" vs 0.41 "and"; without 0.31 vs 0.26; a pure interval mask ties.
TEST_FORM = None
# FlashAttention-4's conditional rescale: a row keeps its running max until a block raises it
# by more than this many log2 units (P then reaches at most 2**LAZY_RESCALE, exact in
# float32 sums and bf16/fp16 P), so most steps' correction factor is exactly 1, and on the
# GPU a thread skips the output's rescale (64 FMULs a step at head_dim 128) with a branch
# unless one of its rows moved (`_rescaled`). None: the running max every step.
LAZY_RESCALE = None
# The per-thread branch around the rescale (False: the multiply by the factor, 1 or not; a
# lab form that separates the branch's effect from the kept max's).
LAZY_BRANCH = True


# --------------------------------------------------------------------------------------------
# The kernel.


def _rescaled(acc: tuple, alpha, branch: bool) -> tuple:
  """The output's parts times each row's correction `alpha` ([64], WGMMA rows). `branch`
  (the GPU): each thread multiplies only where one of its rows' alpha differs from 1, a
  per-thread branch (a warp runs it where any of its threads does), which Pallas cannot write
  (its conditions are warpgroup-uniform scalars), so it is built in Mosaic GPU's IR."""
  if not branch:
    return tuple(a * lax.broadcast_in_dim(alpha, a.shape, [0]) for a in acc)
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, scf, vector
  from jax.experimental.mosaic import gpu as mgpu

  part = plgpu.ShapeDtypeStruct(acc[0].shape, jnp.float32, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=((plgpu.Layout.WGMMA,) * len(acc),
                                plgpu.Layout.WGMMA.reduce(1)),
                     return_type=(part,) * len(acc))
  def scale_if_moved(ctx, parts, alpha):
    del ctx
    one = arith.constant(ir.F32Type.get(), 1.0)
    moved = None
    for reg in alpha.registers.flat:
      for i in range(ir.VectorType(reg.type).shape[0]):
        x = vector.extract(reg, dynamic_position=[], static_position=[i])
        ne = arith.cmpf(arith.CmpFPredicate.UNE, x, one)
        moved = ne if moved is None else arith.ori(moved, ne)
    flat = [r for p in parts for r in p.registers.flat]
    branch_op = scf.IfOp(moved, [r.type for r in flat], has_else=True)
    with ir.InsertionPoint(branch_op.then_block):
      scaled = [p * alpha.broadcast_in_dim(p.shape, (0,), p.layout) for p in parts]
      scf.yield_([r for p in scaled for r in p.registers.flat])
    with ir.InsertionPoint(branch_op.else_block):
      scf.yield_(flat)
    results, out, start = list(branch_op.results), [], 0
    for p in parts:  # the yielded registers, back in each part's register shape
      regs = np.array(results[start:start + p.registers.size]).reshape(p.registers.shape)
      start += p.registers.size
      out.append(mgpu.FragmentedArray(_registers=regs, _layout=p.layout, _is_signed=None))
    return tuple(out)

  return scale_if_moved(tuple(acc), alpha)


def _kernel(order_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, *refs, qb: _Boxes, kb: _Boxes,
            half: tuple[int, ...], half_dim: int, head_dim: int, heads: int, groups: int,
            dims: int, stages: int, q_bufs: int, programs: int, items: int, scale: float, dtype,
            fused_pv: bool, mma_width: int, split: bool, box: tuple | None,
            window: bool = False, mask_fn=None, segments: bool = False, per_head: bool = False,
            segments_full: bool = False, map_heads: int = 1, terms: int = 1,
            sinks: bool = False, softcap: float | None = None, lazy: float | None = None,
            branch: bool = False):
  """Program `p` of `programs` runs work items p, p + programs, ... of `items` (q blocks
  fastest, then heads, then batch; the q blocks in the order `order_ref`).

  One KV list per q block (``split=False``): ids [q blocks, steps], counts [q blocks, 2]
  (full, all). Element masks (``mma_width == 0``): refs are q_lo, q_hi [dims, n_q], kv_c
  [dims, n_kv] (kernel positions; ``terms`` > 1: a union, `plan.any_term`).
  MMA-bias masks: onehot [128, W], tables [n, W, block_kv]
  and table_ids [q blocks, steps] (`_mma_inputs`).

  Per-warpgroup lists (``split=True``, `_split_inputs`): ids are the loads [q blocks, loads,
  3] (KV block, each warpgroup's table), counts [q blocks, 6] (steps, loads, each
  warpgroup's active steps, shared steps, paired steps); refs are onehot [128, W] and tables
  [n, W, block_kv]. Then (``sinks``) learned sink logits [heads] float32, joined to each
  row's softmax in the epilogue (`merge.join_sink`), and out, lse.

  Window-anchored KV boxes (``window``, `_window_inputs`): ids are the steps' box origins
  [q blocks, steps, dims], the rest as with MMA-bias masks.

  ``box`` (`_box_groups`): K/V come as `_box_view`s and a slot is [head_dim // w, *box, 8,
  w] (w: a swizzle group's 64, 32 or 16 columns: `config.swizzle_columns`), one TMA copy per w
  columns; scores sum one wgmma per w columns and the output accumulates in w-column parts.
  Else a slot is [block_kv, head_dim], one copy per row of the tile's last dim."""
  mma = mma_width > 0
  # Element masks may run a mask function (`mask_fn`, on the kernel positions of partial
  # blocks) and compare segment ids (``segments``: vectors ``qx`` [batch, 1, n_q] and ``kx``
  # [batch, 1, n_kv], tested on every block, or on partial blocks only where the map's full
  # blocks hold one segment, ``segments_full``).
  extras = int(segments)
  sinks_ref = None
  if sinks:
    *refs, sinks_ref, out_ref, lse_ref = refs
    refs = (*refs, out_ref, lse_ref)
  if split:
    onehot_ref, tables_ref, out_ref, lse_ref = refs
  elif mma:
    onehot_ref, tables_ref, table_ids_ref, out_ref, lse_ref = refs
  elif extras:
    lo_ref, hi_ref, c_ref, qx_ref, kx_ref, out_ref, lse_ref = refs
  else:
    lo_ref, hi_ref, c_ref, out_ref, lse_ref = refs
  block_kv = math.prod(kb.tile)
  n_q_blocks = math.prod(qb.grid)
  prog = lax.axis_index("prog")
  mine = lax.div(items - prog + programs - 1, programs)  # my work items
  qk_scale = scale * LOG2E

  def item(k):
    """(q block, head, batch) of my k-th work item."""
    i = prog + k * programs
    qi = order_ref[lax.rem(i, n_q_blocks)]
    hb = lax.div(i, n_q_blocks)
    return qi, lax.rem(hb, heads), lax.div(hb, heads)

  def row(qi, head, batch):
    """The map row of an item: its q block's, or with a runtime map (``per_head``: rows per
    batch, `map_heads` heads (1: shared by every head) and q block) its own."""
    if not per_head:
      return qi
    return (batch * map_heads + (head if map_heads > 1 else 0)) * n_q_blocks + qi

  def loads(qi, head, batch):
    """KV tiles the memory warpgroup loads for an item."""
    return counts_ref[row(qi, head, batch), 1]

  # Output accumulator parts: one per swizzle group of a box slot.
  parts = head_dim // swizzle_columns(head_dim) if box is not None else 1
  width = head_dim // parts

  def kv_part(smem, slot, i):
    """Columns [w i, w i + w) of a K/V slot as [block_kv, w] (box), or the slot."""
    return smem.at[slot, i].reshape(block_kv, width) if box is not None else smem.at[slot]

  def q_origin(qi, wg):
    origin = list(qb.origin(qi))
    origin[half_dim] = origin[half_dim] + wg * half[half_dim]
    return origin

  def body(q_smem, k_smem, v_smem, row_smem, step_smem, lse_smem, p_smem, q_bar, q_free,
           row_bar, k_bar, v_bar, k_free, v_free, turn):
    """q_smem: [q_bufs, warpgroup] Q tiles (the memory warpgroup loads item k into buffer
    k % q_bufs; the output leaves through it). row_smem: the one-hot [warpgroup, 64, W] or
    per buffer and warpgroup (lo, hi) [.., 2, dims, 64]; step_smem: per slot, the key
    coordinates [dims, block_kv], the test matrix [W, block_kv] or (split) one per
    warpgroup [2, W, block_kv]."""
    wg = lax.axis_index("wg")
    if extras:
      (row_smem, qx_smem), (step_smem, kx_smem) = row_smem, step_smem
    # Window boxes start anywhere along the last dim, which Mosaic's tiled copies do not
    # allow (a tiled dim's start must be a multiple of its 8 rows): the TMA writes the same
    # bytes through a swizzled view without tiling (`kv_raw`), the wgmmas read the tiled one.
    k_raw, v_raw = k_smem, v_smem
    if box is not None and window:
      (k_smem, k_raw), (v_smem, v_raw) = k_smem, v_smem

    def scores(acc_ref, qo, slot):
      """acc_ref += Q K^T of `slot` (one wgmma per swizzle group of a box slot)."""
      for i in range(parts):
        a = qo if parts == 1 else qo.at[:, pl.ds(i * width, width)]
        plgpu.wgmma(acc_ref, a, kv_part(k_smem, slot, i).transpose((1, 0)))

    def rendezvous():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      if mma:
        plgpu.copy_gmem_to_smem(onehot_ref.at[pl.ds(wg * _ROWS, _ROWS)], row_smem.at[wg],
                                row_bar.at[wg])
        plgpu.barrier_wait(row_bar.at[wg])

      def softmax(s, m_i, l_i, acc, elementwise):
        """Online softmax of scores `s` (with `softcap`: capped, in log2 units already): (the
        rescaled acc, new max, new sum, P)."""
        to_log2 = (lambda x: x) if softcap is not None else (lambda x: x * qk_scale)
        m_new = jnp.maximum(m_i, to_log2(s.max(axis=1)))
        if lazy is not None:  # keep the running max unless it grew by more than `lazy`
          m_new = jnp.where((m_new > m_i + lazy) | (m_i == -jnp.inf), m_new, m_i)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if elementwise else m_new
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(to_log2(s) - lax.broadcast_in_dim(m_use, s.shape, [0]))
        acc = _rescaled(acc, alpha, branch and lazy is not None)
        l_i = l_i * alpha + p.sum(axis=1)
        return acc, m_new, l_i, p.astype(dtype)

      def pv(acc, p16, slot, during=None):
        """acc (its parts) + P·V of `slot`; `during()` runs while the wgmmas do."""
        if p_smem is not None:  # interpret mode: wgmma operand A from shared memory only
          p_smem.at[wg][...] = p16
          plgpu.commit_smem()
          p16 = p_smem.at[wg]

        def run(acc_refs):
          for i, acc_ref in enumerate(acc_refs):
            plgpu.wgmma(acc_ref, p16, kv_part(v_smem, slot, i))
          if during is not None:
            during()
          if not fused_pv:
            return acc_refs[0][...]

        if fused_pv:  # accumulate into acc (interpret mode has no run_state)
          return pl.run_state(run)(tuple(plgpu.ACC.init(a) for a in acc))
        return (acc[0] + pl.run_scoped(lambda r: run((r,)),
                                       plgpu.ACC((_ROWS, head_dim), jnp.float32)),)

      def finish(qi, head, batch, qo, buf, acc, m_i, l_i):
        pl.when(wg == 0)(rendezvous)
        # MMA bias: masked scores sit near -2**20 (log2 units), so a row that saw no key has
        # its max below half of that; element masks leave such a row at l == 0.
        seen = m_i > 0.5 * mma_masks.MASKED if mma else l_i > 0.0
        l_safe = jnp.where(seen, l_i, 1.0)
        lse2 = jnp.where(seen, m_i + jnp.log(l_safe) * LOG2E, -jnp.inf)  # log2 units
        if sinks_ref is not None:  # out = acc / l * share: l / share is inf where share = 0
          lse2, share = join_sink(lse2, sinks_ref[head] * LOG2E, seen, jnp.exp2,
                                  lambda x: jnp.log(x) * LOG2E)
          l_safe = l_safe / share
        for i, a in enumerate(acc):
          out = (a / lax.broadcast_in_dim(l_safe, a.shape, [0])).astype(dtype)
          if parts == 1:
            qo[...] = out
          else:
            qo.at[:, pl.ds(i * width, width)][...] = out
        lse_smem.at[wg][...] = lse2 * LN2
        plgpu.commit_smem()
        for r, index in qb.rows(q_origin(qi, wg), half):
          plgpu.copy_smem_to_gmem(qo.at[pl.ds(r, half[-1])], out_ref.at[(batch, *index, head)])
          plgpu.copy_smem_to_gmem(lse_smem.at[wg, pl.ds(r, half[-1])],
                                  lse_ref.at[(batch, head, *index)])
        # The buffer (and lse_smem) may be refilled once the stores have read them.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(q_free.at[buf])

      def start(k):
        qi, head, batch = item(k)
        buf = lax.rem(k, q_bufs)
        plgpu.barrier_wait(q_bar.at[buf * _COMPUTE_WGS + wg])
        m_i = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((_ROWS,), 0.0, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        acc = tuple(plgpu.layout_cast(jnp.full((_ROWS, width), 0.0, jnp.float32),
                                      plgpu.Layout.WGMMA) for _ in range(parts))
        return qi, head, batch, buf, q_smem.at[buf, wg], (acc, m_i, l_i)

      def work(k, g):
        """My k-th item, whose first KV step is the g-th of this program."""
        qi, head, batch, buf, qo, carry = start(k)
        r = row(qi, head, batch)
        n_all, n_full = counts_ref[r, 1], counts_ref[r, 0]

        @pl.when(n_all > 0)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(g, stages)])

        pl.when(wg == 1)(rendezvous)

        def step(t, carry, masked: bool):
          acc, m_i, l_i = carry
          slot = lax.rem(g + t, stages)

          def qk(acc_ref):
            if masked and mma:  # the bias first: onehot [64, W] @ test [W, block_kv]
              plgpu.wgmma(acc_ref, row_smem.at[wg], step_smem.at[slot])
            scores(acc_ref, qo, slot)
            rendezvous()
            return acc_ref[...]

          s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_kv), jnp.float32))
          if softcap is not None:  # capped in log2 units, before any mask
            s = capped2(s * qk_scale, softcap, floor=masked and bool(mma))
          test_segments = segments and (masked or not segments_full)
          elementwise = (masked or test_segments) and not mma
          # TEST_FORM "each": each test masks the scores as soon as it is made; "and": the
          # tests' running AND masks them once.
          tests = []
          form = TEST_FORM or ("each" if test_segments else "and")

          def mask_out(term, s):
            if form == "and":
              tests.append(term)
              return s
            return jnp.where(term, s, -jnp.inf)

          shape = (_ROWS, block_kv)
          def in_dim(d):  # lo[q] <= c[k] <= hi[q] along mask dim d
            c = plgpu.load(step_smem.at[slot, d], layout=plgpu.Layout.WGMMA.reduce(0))
            c = lax.broadcast_in_dim(c, shape, [1])
            lo, hi = (plgpu.load(row_smem.at[buf, wg, i, d],
                                 layout=plgpu.Layout.WGMMA.reduce(1)) for i in range(2))
            return ((c >= lax.broadcast_in_dim(lo, shape, [0]))
                    & (c <= lax.broadcast_in_dim(hi, shape, [0])))

          if masked and not mma:  # per dim, or a union's OR of ANDs as one test
            s = mask_intervals(s, in_dim, dims, terms, mask_out)
          if mask_fn is not None and masked:  # on kernel positions, as the Triton kernels
            iota = lambda dim: plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, shape, dim),
                                                 plgpu.Layout.WGMMA)
            s = mask_out(mask_fn(qi * (2 * _ROWS) + wg * _ROWS + iota(0),
                                 ids_ref[row(qi, head, batch), t] * block_kv + iota(1)), s)
          if test_segments:
            s = mask_out(lax.broadcast_in_dim(plgpu.load(qx_smem.at[buf, wg, 0],
                                                         layout=plgpu.Layout.WGMMA.reduce(1)),
                                              shape, [0])
                         == lax.broadcast_in_dim(plgpu.load(kx_smem.at[slot, 0],
                                                            layout=plgpu.Layout.WGMMA.reduce(0)),
                                                 shape, [1]), s)
          plgpu.barrier_arrive(k_free.at[slot])
          if tests:
            s = jnp.where(functools.reduce(lambda a, b: a & b, tests), s, -jnp.inf)
          acc, m_new, l_i, p16 = softmax(s, m_i, l_i, acc, elementwise)
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
          plgpu.barrier_arrive(turn)
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_wait(turn)

          def next_k():  # wait for the next K while the P·V wgmma runs
            nxt = t + 1

            @pl.when(nxt < n_all)
            def _():
              plgpu.barrier_wait(k_bar.at[lax.rem(g + nxt, stages)])

          acc = pv(acc, p16, slot, next_k)
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m_new, l_i

        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
        finish(qi, head, batch, qo, buf, *carry)
        return g + n_all

      def work_split(k, g):
        """`work` over per-warpgroup lists (`_split_inputs`). Steps [0, shared) hold one
        load both warpgroups compute on; steps [shared, shared + pairs) two loads, one per
        warpgroup; later steps one load, for the warpgroup with the longer list (the other
        idles). Both warpgroups wait for and release every load of every step and keep the
        turn order, so the barriers stay in phase. Load indices follow from the step (no
        per-step reads), and every step adds the MMA bias (a branch on the block's kind
        measured slower on the H100 than the bias on full blocks, whose table 0 is zeros)."""
        qi, head, batch, buf, qo, carry = start(k)
        n_steps, n_active = counts_ref[qi, 0], counts_ref[qi, 2 + wg]
        n_shared, n_pairs = counts_ref[qi, 4], counts_ref[qi, 5]

        def loads_of(t):
          """(the step's first load, whether it has two) as program-wide load indices."""
          paired = (t >= n_shared) & (t < n_shared + n_pairs)
          first = t + jnp.minimum(jnp.maximum(t - n_shared, 0), n_pairs)
          return g + first, paired

        def each_load(t, fn):
          base, paired = loads_of(t)
          fn(lax.rem(base, stages))
          pl.when(paired)(lambda: fn(lax.rem(base + 1, stages)))

        def wait_k(t):
          pl.when(t < n_steps)(lambda: each_load(t, lambda s: plgpu.barrier_wait(k_bar.at[s])))

        wait_k(0)
        pl.when(wg == 1)(rendezvous)

        def step(t, carry, active: bool):
          acc, m_i, l_i = carry
          if active:
            base, paired = loads_of(t)
            slot = lax.rem(base + jnp.where(paired, wg, 0), stages)

            def qk(acc_ref):  # the bias first: onehot [64, W] @ my test matrix [W, block_kv]
              plgpu.wgmma(acc_ref, row_smem.at[wg], step_smem.at[slot, wg])
              scores(acc_ref, qo, slot)
              rendezvous()
              return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_kv), jnp.float32))
            if softcap is not None:  # every step has the bias: its masked scores stay
              s = capped2(s * qk_scale, softcap, floor=True)
          else:
            rendezvous()
          each_load(t, lambda s: plgpu.barrier_arrive(k_free.at[s]))
          if active:
            acc, m_i, l_i, p16 = softmax(s, m_i, l_i, acc, False)
            acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
          plgpu.barrier_arrive(turn)
          each_load(t, lambda s: plgpu.barrier_wait(v_bar.at[s]))
          plgpu.barrier_wait(turn)
          if active:  # wait for the next step's K while the P·V wgmma runs
            acc = pv(acc, p16, slot, lambda: wait_k(t + 1))
          else:
            wait_k(t + 1)
          each_load(t, lambda s: plgpu.barrier_arrive(v_free.at[s]))
          return acc, m_i, l_i

        carry = lax.fori_loop(0, n_active, functools.partial(step, active=True), carry)
        carry = lax.fori_loop(n_active, n_steps, functools.partial(step, active=False), carry)
        finish(qi, head, batch, qo, buf, *carry)
        return g + loads(qi, head, batch)

      lax.fori_loop(0, mine, work_split if split else work, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def work(k, g):
        qi, head, batch = item(k)
        buf = lax.rem(k, q_bufs)

        @pl.when(k >= q_bufs)
        def _():
          plgpu.barrier_wait(q_free.at[buf])

        for w in range(_COMPUTE_WGS):
          bar = q_bar.at[buf * _COMPUTE_WGS + w]
          for r, index in qb.rows(q_origin(qi, w), half):
            plgpu.copy_gmem_to_smem(q_ref.at[(batch, *index, head)],
                                    q_smem.at[buf, w, pl.ds(r, half[-1])], bar)
          if not mma:
            row0 = qi * (2 * _ROWS) + w * _ROWS
            for i, ref in enumerate((lo_ref, hi_ref)):
              plgpu.copy_gmem_to_smem(ref.at[:, pl.ds(row0, _ROWS)], row_smem.at[buf, w, i],
                                      bar)
            if extras:
              plgpu.copy_gmem_to_smem(qx_ref.at[batch, :, pl.ds(row0, _ROWS)],
                                      qx_smem.at[buf, w], bar)
        kv_head = lax.div(head, groups)

        @pl.loop(0, loads(qi, head, batch))
        def _(t):
          if window:
            origin = [ids_ref[qi, t, d] for d in range(len(kb.tile))]
          else:
            j = ids_ref[qi, t, 0] if split else ids_ref[row(qi, head, batch), t]
            origin = kb.origin(j)
          slot = lax.rem(g + t, stages)
          reuse = g + t >= stages

          def copy_rows(src, dst, bar):  # the step's KV tile: per column group, or per row
            tiled, raw = dst
            if box is not None and not window:
              # src: [batch, *spatial[:-1], last // 8, 8, heads, parts, width]
              start = (*origin[:-1], lax.div(origin[-1], 8))
              index = tuple(pl.ds(o, n) if n > 1 else o
                            for o, n in zip(start, (*kb.tile[:-1], kb.tile[-1] // 8)))
              for i in range(parts):
                plgpu.copy_gmem_to_smem(src.at[(batch, *index, slice(None), kv_head, i,
                                                slice(None))], tiled.at[slot, i], bar.at[slot])
              return
            # window boxes (src: [batch, *spatial, heads, parts, width]; dst: its raw view),
            # or one copy per row
            copy_box(src, raw if box is not None else tiled, slot, batch, kv_head, origin, kb,
                     parts, box, bar.at[slot])

          @pl.when(reuse)
          def _():
            plgpu.barrier_wait(k_free.at[slot])

          copy_rows(k_ref, (k_smem, k_raw), k_bar)
          if split:  # each warpgroup's test matrix (table 0 where it has none)
            for w in range(_COMPUTE_WGS):
              plgpu.copy_gmem_to_smem(tables_ref.at[ids_ref[qi, t, 1 + w]],
                                      step_smem.at[slot, w], k_bar.at[slot])
          elif mma:  # unmasked steps load table 0 too: a fixed arrival count
            plgpu.copy_gmem_to_smem(tables_ref.at[table_ids_ref[qi, t]], step_smem.at[slot],
                                    k_bar.at[slot])
          else:
            plgpu.copy_gmem_to_smem(c_ref.at[:, pl.ds(j * block_kv, block_kv)],
                                    step_smem.at[slot], k_bar.at[slot])
            if extras:
              plgpu.copy_gmem_to_smem(kx_ref.at[batch, :, pl.ds(j * block_kv, block_kv)],
                                      kx_smem.at[slot], k_bar.at[slot])

          @pl.when(reuse)
          def _():
            plgpu.barrier_wait(v_free.at[slot])

          copy_rows(v_ref, (v_smem, v_raw), v_bar)

        return g + loads(qi, head, batch)

      total = lax.fori_loop(0, mine, work, jnp.int32(0))
      # Observe every barrier's last completion before the barriers are freed.
      for s in range(stages):
        @pl.when(s < total)
        def _():
          plgpu.barrier_wait(k_free.at[s])
          plgpu.barrier_wait(v_free.at[s])
      for b in range(q_bufs):
        pl.when(b < mine)(lambda: plgpu.barrier_wait(q_free.at[b]))

  q_rows = math.prod(half[:-1])
  tiles = swizzled(head_dim)
  if box is not None:  # unit tiling over the box dims: the slot folds to [block_kv, width]
    kv_copies = parts
    kv_smem = box_slots(stages, parts, box, width, dtype, kb.tile if window else None)
  else:
    kv_copies = math.prod(kb.tile[:-1])
    kv_smem = plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=tiles)
  if mma:  # wgmma operands with K = W: (8, W) tiles, swizzle 2W bytes (bf16)
    narrow = (plgpu.TilingTransform((8, mma_width)), plgpu.SwizzleTransform(2 * mma_width))
    row_smem = plgpu.SMEM((_COMPUTE_WGS, _ROWS, mma_width), jnp.bfloat16, transforms=narrow)
    per_slot = (_COMPUTE_WGS, mma_width, block_kv) if split else (mma_width, block_kv)
    step_smem = plgpu.SMEM((stages, *per_slot), jnp.bfloat16, transforms=narrow)
  else:
    row_smem = plgpu.SMEM((q_bufs, _COMPUTE_WGS, 2, dims, _ROWS), jnp.int32)
    step_smem = plgpu.SMEM((stages, dims, block_kv), jnp.int32)
    if extras:
      row_smem = (row_smem, plgpu.SMEM((q_bufs, _COMPUTE_WGS, extras, _ROWS), jnp.int32))
      step_smem = (step_smem, plgpu.SMEM((stages, extras, block_kv), jnp.int32))
  step_copies = (_COMPUTE_WGS if split else 1) + extras
  pl.run_scoped(
      body,
      plgpu.SMEM((q_bufs, _COMPUTE_WGS, _ROWS, head_dim), dtype, transforms=tiles),
      kv_smem,
      kv_smem,
      row_smem,
      step_smem,
      plgpu.SMEM((_COMPUTE_WGS, _ROWS), jnp.float32),
      None if fused_pv else plgpu.SMEM((_COMPUTE_WGS, _ROWS, block_kv), dtype, transforms=tiles),
      plgpu.Barrier(num_arrivals=q_rows + (0 if mma else 2) + extras,
                    num_barriers=q_bufs * _COMPUTE_WGS),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=q_bufs),
      plgpu.Barrier(num_arrivals=1, num_barriers=_COMPUTE_WGS),
      plgpu.Barrier(num_arrivals=kv_copies + step_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=kv_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
      collective_axes="wg",
  )


def _extras(plan: AttentionPlan, batch: int, q_seg, kv_seg) -> list:
  """The element test's per-token vectors [batch, 1, padded length] for queries and keys:
  segment ids (padding: -1 for queries, -2 for keys, so that padding matches nothing); none
  without segment ids. (A mask function runs on kernel positions, made in-kernel.)"""
  n_q, n_kv = plan.q_layout.padded_len, plan.kv_layout.padded_len
  qx, kx = [], []
  if q_seg is not None:
    pad = lambda x, n, v: jnp.pad(jnp.asarray(x, jnp.int32), [(0, 0), (0, n - x.shape[1])],
                                  constant_values=v)
    qx.append(pad(q_seg, n_q, -1))
    kx.append(pad(kv_seg, n_kv, -2))
  if not qx:
    return []
  return [jnp.stack(qx, axis=1), jnp.stack(kx, axis=1)]

def forward(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, config, interpret,
            block_map=None, sinks=None, softcap=None):
  """Arrays as `triton_attention.forward` (kernel order, or the caller's flat order for
  gathered plans). Returns out like q and lse [batch, heads, n_q] float32 (natural log).
  `block_map`: a runtime map (`block_map.from_selection`, 1-D plans) instead of the plan's:
  the element test on partial blocks, one program per item. `sinks`: learned sink logits
  [heads] float32, joined to every row's softmax in the epilogue. `softcap`: logit
  soft-capping (`softcap.capped`)."""
  cfg = _config(config)
  b, sq, h, d = q.shape
  why = unsupported(plan, d, q.dtype, q_seg is not None, scale)
  if why is not None:
    raise ValueError(f"backend='mosaic_gpu' does not support {why}")
  walked = walked_map(plan, block_map)
  if plan.gathered and ((q_seg is not None and not BOX_SEGMENTS)
                       or not (_box_layout(plan.q_layout) and _box_layout(plan.kv_layout))):
    # Blocks that are not boxes of the caller's layout (`_box_layout`): permute.
    ql, kl = plan.q_layout, plan.kv_layout
    # Q and K/V grids differ on context-parallel shards (a slab and its halo).
    out, lse = forward(kernel_order(q, ql), kernel_order(k, kl), kernel_order(v, kl), q_seg,
                       kv_seg, gathered(plan, False), scale, cfg, interpret, sinks=sinks,
                       softcap=softcap)
    return caller_order(out, ql), caller_order(lse.transpose(0, 2, 1), ql).transpose(0, 2, 1)
  dpad = _padded_head_dim(d)
  if dpad != d:
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, dpad - d)])
    out, lse = forward(pad(q), pad(k), pad(v), q_seg, kv_seg, plan, scale, cfg, interpret,
                       block_map, sinks, softcap)
    return out[..., :d], lse
  hkv = k.shape[2]
  fused_pv = cfg.fused_pv if cfg.fused_pv is not None else not interpret
  itemsize = jnp.dtype(q.dtype).itemsize
  stages = _stages(cfg, d, plan.block_kv, itemsize, fused_pv)
  # The form the config asks for decides; interpret mode's default P buffer (the unfused
  # form it runs in place of the GPU's) does not count.
  smem = _smem_bytes(d, plan.block_kv, stages, itemsize,
                     cfg.fused_pv if cfg.fused_pv is not None else True)
  # A second Q buffer, where it fits, lets the next item's Q load during this one.
  two_q = _smem_bytes(d, plan.block_kv, stages, itemsize, fused_pv, q_bufs=2)
  q_bufs = 2 if two_q <= _SMEM_LIMIT else 1
  if smem > _SMEM_LIMIT:
    raise ValueError(f"MosaicGPUConfig.stages={stages} needs {smem} bytes of shared memory "
                     f"with head_dim {d} and block_kv {plan.block_kv} (at most {_SMEM_LIMIT}"
                     f" on Hopper): use fewer stages or block_kv=64")
  if plan.gathered:
    qb, kb = _boxes(plan.q_layout), _boxes(plan.kv_layout)
  else:  # kernel order: 1-D blocks
    qb = _boxes(SequenceLayout(plan.q_layout.padded_len, plan.block_q))
    kb = _boxes(SequenceLayout(plan.kv_layout.padded_len, plan.block_kv))
  half, half_dim = _half_tile(qb.tile)
  bmap = plan.block_map
  box_ok = box_copies(cfg, interpret) and fused_pv
  # On the GPU window boxes need box copies: Mosaic's row copies start a tiled dim only on
  # a multiple of 8 rows.
  # Mask functions and segment ids: the element test (segment ids as vectors, `_extras`);
  # unions of interval masks as intervals per term (`element.mask_vectors`).
  lo, hi, c, terms, mask_fn = mask_vectors(plan)
  extras = mask_fn is not None or q_seg is not None or terms > 1
  runtime = block_map is not None
  window = (window_lists(plan, scale, cfg) if not extras and not runtime
            and (interpret or (box_ok and _window_groups(kb.tile))) else None)
  split = None if window is not None or extras or runtime else split_lists(plan, scale, cfg)
  if window is not None:
    origins, counts_np, onehot, tables, table_ids = window
    ids, counts = jnp.asarray(origins), jnp.asarray(counts_np)
    mask_arrays = [jnp.asarray(onehot), jnp.asarray(tables), jnp.asarray(table_ids)]
    width, row_counts = onehot.shape[1], counts_np[:, 1]
  elif split is not None:
    onehot, tables, loads, counts_np = split
    ids, counts = jnp.asarray(loads), jnp.asarray(counts_np)
    mask_arrays = [jnp.asarray(onehot), jnp.asarray(tables)]
    width, row_counts = onehot.shape[1], counts_np[:, 0]
  else:
    # A runtime map's rows are per (batch, head, q block) (`_kernel`'s ``per_head``); q
    # blocks are visited in the static map's order either way.
    ids = jnp.asarray(walked.kv_ids, jnp.int32).reshape(-1, walked.max_kv)
    counts = jnp.stack([jnp.asarray(walked.kv_full_counts, jnp.int32),
                        jnp.asarray(walked.kv_counts, jnp.int32)], axis=-1).reshape(-1, 2)
    row_counts = bmap.kv_counts
    mma = _mma_inputs(plan, scale) if cfg.mask_mma and not extras and not runtime else None
    if mma is None:
      mask_arrays = [jnp.asarray(x, jnp.int32) for x in (lo, hi, c)]
      mask_arrays += _extras(plan, b, q_seg, kv_seg)
      width = 0
    else:
      onehot, tables, table_ids = mma
      mask_arrays = [jnp.asarray(onehot), jnp.asarray(tables), jnp.asarray(table_ids)]
      width = onehot.shape[1]
  padded = tuple(g * t for g, t in zip(qb.grid, qb.tile))
  items = bmap.num_q_blocks * h * b
  # Runtime maps of documents (rows shared by the heads): persistent where rows are short (at
  # most 8 blocks, as under a sliding window; H200, LM layer 0.28 vs 0.29 ms, causal window
  # 512 0.19 vs 0.22, docs/experiments/h200-2026-11-29-lm-forward.json); routed maps (rows
  # per head, lengths unknown until run time) one program per item.
  if cfg.persistent is not None:
    persistent = cfg.persistent
  elif runtime:
    persistent = walked.shares_heads and walked.max_kv <= 8
  else:
    persistent = _persistent_default(row_counts)
  programs = min(items, _programs(cfg, interpret)) if persistent else items
  box = None
  if box_ok:
    box = _window_groups(kb.tile) if window is not None else _box_groups(kb.tile)
  kv_view = _view if box is None else _window_view if window is not None else _box_view
  kernel = functools.partial(
      _kernel, qb=qb, kb=kb, half=half, half_dim=half_dim, head_dim=d, heads=h,
      groups=h // hkv, dims=lo.shape[0], stages=stages, q_bufs=q_bufs,
      programs=programs, items=items, scale=scale, dtype=q.dtype, fused_pv=fused_pv,
      mma_width=width, split=split is not None, box=box, window=window is not None,
      mask_fn=mask_fn, segments=q_seg is not None, per_head=runtime,
      segments_full=walked.segments_full,
      map_heads=walked.kv_ids.shape[1] if runtime else 1, terms=terms,
      sinks=sinks is not None, softcap=softcap, lazy=LAZY_RESCALE,
      branch=LAZY_BRANCH and not interpret)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, *qb.spatial, h, d), q.dtype),
                jax.ShapeDtypeStruct((b, h, *padded), jnp.float32)),
      grid=(programs,),
      grid_names=("prog",),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret_params(interpret),
  )(_order(row_counts, cfg.longest_first), ids, counts, _view(q, qb), kv_view(k, kb),
    kv_view(v, kb), *mask_arrays, *([] if sinks is None else [sinks.astype(jnp.float32)]))
  lse = lse[(slice(None), slice(None), *(slice(0, s) for s in qb.spatial))]
  return out.reshape(q.shape), lse.reshape(b, h, sq)
