"""Block-sparse flash attention in Pallas with the Triton lowering (any CUDA GPU Pallas supports).

Three kernels, each reading the block map (`jax_sparse_attn.block_map`):

* forward: grid (Q tiles, batch*heads). Load the Q tile once, loop over the visited KV blocks
  (full blocks first with no mask arithmetic, then partial blocks with the element mask
  rebuilt from the per-token interval vectors), online softmax in float32 (base 2, the scale
  folded into one multiply), write O and the log-sum-exp.
* dQ: grid (Q tiles, batch*heads), the same loop, recomputing P from the saved LSE.
* dK/dV: grid (KV tiles, batch*kv_heads), looping over the transposed map (the Q blocks that
  visit this KV block) and over the query heads of the GQA group: no atomics.

Kernel tiles (``TritonConfig``) may be smaller than the block-map blocks: a block-map block of
128 rows is processed as two programs of 64 rows, etc. Arrays are in kernel order (see
`jax_sparse_attn.plan`): q [batch, padded_q, heads, head_dim]; k, v [batch, padded_kv,
kv_heads, head_dim]; lse [batch, heads, padded_q] float32 (natural log).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # deprecated from jax 0.11: a later jax may not have it
  from jax.experimental.pallas import triton as plgpu
except ImportError:
  plgpu = None

from jax_sparse_attn import backends
from jax_sparse_attn.merge import join_sink
from jax_sparse_attn.plan import AttentionPlan, any_term, intervals_per_term, walked_map
from jax_sparse_attn.softcap import capped2, slope2

from . import mma_masks

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# JSA_TRITON=0 runs nothing on Pallas' Triton lowering (as if jax had none): `auto` and the
# Hopper backend's backward then never pick these kernels.
_DISABLED_BY_ENV = os.environ.get("JSA_TRITON", "1").strip().lower() in ("0", "false", "off",
                                                                        "no")


def available() -> bool:
  """Whether these kernels can run: this jax has Pallas' Triton lowering
  (`jax.experimental.pallas.triton`, deprecated in jax 0.11/0.12) and ``JSA_TRITON=0`` is
  not set. Without it `backend="auto"` runs the Hopper kernels (every mask, forward and
  backward) on sm90 and `xla` on other GPUs."""
  return plgpu is not None and not _DISABLED_BY_ENV


def check_available() -> None:
  """ValueError naming why the Triton kernels cannot run here (`available`)."""
  if plgpu is None:
    raise ValueError(
        f"backend='triton' needs Pallas' Triton lowering (jax.experimental.pallas.triton), "
        f"which jax {jax.__version__} does not have: use backend='mosaic_gpu' (Hopper), "
        f"'xla' or 'auto'")
  if _DISABLED_BY_ENV:
    raise ValueError("backend='triton' is switched off by JSA_TRITON=0 in the environment: "
                     "use backend='mosaic_gpu' (Hopper), 'xla' or 'auto'")


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Tile sizes and launch parameters. Tiles must divide the block-map block sizes.

  ``block_*``/``num_*``: forward kernel; ``bwd_*``: dK/dV kernel; ``dq_*``: dQ kernel.

  ``None`` fields take the tuned defaults for (head_dim, dtype) from `default_config`.
  fp32 inputs use full-precision (IEEE) dots unless ``allow_tf32``.
  """
  block_q: int | None = None
  block_kv: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  bwd_block_q: int | None = None
  bwd_block_kv: int | None = None
  bwd_num_warps: int | None = None
  bwd_num_stages: int | None = None
  dq_block_q: int | None = None
  dq_block_kv: int | None = None
  dq_num_warps: int | None = None
  dq_num_stages: int | None = None
  allow_tf32: bool = False
  # One loop per partial-dims group (tests only the partial dims) instead of one partial loop
  # testing every dim. Measured slower on the H100 (2-D NA 128x128 k33, tiled order: 1.80 ms vs
  # 1.62 ms; 3-D: 10.6 vs 7.96 ms): each extra pipelined loop costs more than the masks saved.
  split_partial_groups: bool = False
  # One loop over every visited block with the mask always applied (no separate full-block
  # loop): one pipelined loop per program, mask work on full blocks too. None: only in the
  # forward with 128-row query tiles and table masks (H100, 2-D NA 128x128 k33, (16,8)/(8,8)
  # tiles: 1.26 vs 1.29 ms; 3-D 5.60 vs 5.58; 64-row tiles 1.45 vs 1.41; element masks
  # slower: docs/experiments/h100-2026-11-23-na-variants-single-loop.json, -loop-variants).
  single_loop: bool | None = None
  # Test each mask interval with one unsigned compare, (c - lo) <=u (hi - lo), instead of two
  # signed compares and an AND.
  unsigned_intervals: bool = True
  # Neighborhood masks: build the partial-block mask as an additive bias from one small matmul
  # (`_MMABias`) instead of testing every element; used where the bias width is <= 32.
  mask_mma: bool = True
  # Which tile the MMA bias's one-hot matrix describes: "rows" (the program's own tile; the
  # per-step test is the matmul's B operand) or "loop" (the visited tile; the test is A).
  # With tests computed in the loop, "rows" measured faster on the H100 (3-D NA 16x64x64 fwd,
  # tiles (2,8,8)/(1,8,8): 6.58 vs 7.33 ms, docs/experiments/h100-2026-11-23-na-onehot-side.json).
  # "auto": with tables (`mask_tables`) the side with fewer columns (the matmul's K), else "rows".
  mma_onehot: str = "auto"
  # MMA-bias masks with one-hot rows: read each partial step's [W, loop tile] test matrix
  # from a table built once at trace time (deduplicated: shift-invariant neighborhoods need
  # few distinct ones) instead of computing it in the loop. Static block maps only.
  mask_tables: bool = True


# Measured on the H100 (bf16, dense S=16384; docs/experiments/h100-2026-11-23-triton-sweep*.json):
# padded head_dim -> block-map blocks and (tile_q, tile_kv, warps, stages) per kernel.
# 256 is not tuned (smaller tiles, 8 warps, to fit registers).
TUNED = {
    64: dict(map=(128, 128), fwd=(128, 128, 4, 2), dq=(128, 64, 4, 2), dkv=(128, 64, 4, 2)),
    128: dict(map=(128, 64), fwd=(128, 64, 4, 2), dq=(64, 64, 4, 2), dkv=(64, 64, 4, 2)),
    256: dict(map=(64, 64), fwd=(64, 64, 8, 2), dq=(64, 64, 8, 2), dkv=(64, 64, 8, 2)),
}


def _tuned(head_dim: int) -> dict:
  d = _padded_head_dim(head_dim)
  return TUNED[min(max(d, 64), 256)]


def default_map_blocks(head_dim: int, dtype) -> tuple[int, int]:
  return _tuned(head_dim)["map"]


def default_backward_map_blocks(head_dim: int, dtype, config: TritonConfig | None, mask=None,
                                segments: bool = False):
  """Map blocks matching the backward kernels' tiles: the dQ query tile, the dK/dV key tile
  (a 128-row map under 64-row dQ programs visits the whole row's blocks twice). None when
  `config` sets backward tiles (they must divide the forward's map). Any mask, with or
  without segment ids."""
  del segments
  if config is not None and any(x is not None for x in (
      config.dq_block_q, config.dq_block_kv, config.bwd_block_q, config.bwd_block_kv)):
    return None
  table = _tuned(head_dim)
  return table["dq"][0], table["dkv"][1]


def default_config(head_dim: int, dtype, plan: AttentionPlan, config: TritonConfig | None):
  config = config or TritonConfig()
  table = _tuned(head_dim)
  bq, bk = plan.block_q, plan.block_kv
  fill = lambda v, default: default if v is None else v
  fwd, dq, dkv = table["fwd"], table["dq"], table["dkv"]
  cfg = TritonConfig(
      block_q=fill(config.block_q, min(bq, fwd[0])),
      block_kv=fill(config.block_kv, min(bk, fwd[1])),
      num_warps=fill(config.num_warps, fwd[2]),
      num_stages=fill(config.num_stages, fwd[3]),
      bwd_block_q=fill(config.bwd_block_q, min(bq, dkv[0])),
      bwd_block_kv=fill(config.bwd_block_kv, min(bk, dkv[1])),
      bwd_num_warps=fill(config.bwd_num_warps, dkv[2]),
      bwd_num_stages=fill(config.bwd_num_stages, dkv[3]),
      dq_block_q=fill(config.dq_block_q, min(bq, dq[0])),
      dq_block_kv=fill(config.dq_block_kv, min(bk, dq[1])),
      dq_num_warps=fill(config.dq_num_warps, dq[2]),
      dq_num_stages=fill(config.dq_num_stages, dq[3]),
      allow_tf32=config.allow_tf32, split_partial_groups=config.split_partial_groups,
      single_loop=config.single_loop, unsigned_intervals=config.unsigned_intervals,
      mask_mma=config.mask_mma, mma_onehot=config.mma_onehot, mask_tables=config.mask_tables)
  if cfg.mma_onehot not in ("auto", "rows", "loop"):
    raise ValueError("TritonConfig.mma_onehot must be 'auto', 'rows' or 'loop', got "
                     f"{cfg.mma_onehot!r}")
  for name, tile, block in (("block_q", cfg.block_q, bq), ("block_kv", cfg.block_kv, bk),
                            ("bwd_block_q", cfg.bwd_block_q, bq),
                            ("bwd_block_kv", cfg.bwd_block_kv, bk),
                            ("dq_block_q", cfg.dq_block_q, bq), ("dq_block_kv", cfg.dq_block_kv, bk)):
    if tile <= 0 or tile & (tile - 1) or block % tile:
      raise ValueError(f"TritonConfig.{name}={tile} must be a power of two dividing the "
                       f"block-map block size {block}")
  return cfg


def _padded_head_dim(d: int) -> int:
  return max(16, pl.next_power_of_2(d))


# --------------------------------------------------------------------------------------------
# Element masks of partial blocks.

# Unions of interval masks (``causal & (window | sink)``) tested as intervals per term
# (`plan.intervals_per_term`: an OR over terms of each term's merged dims) instead of the mask
# function on kernel positions: on an H100 the LM layer's mask (S=8192, GQA 16/4) trained in
# 2.03-2.05 ms against 2.17-2.20, forward equal (docs/experiments/h100-2026-12-07-array-masks
# .json). False: the mask function, except where it holds arrays (which it cannot trace).
UNION_TERMS = True


def _table_inputs(plan: AttentionPlan, spec: mma_masks.MaskSpec, rows: int, loop_size: int,
                  loop_is_kv: bool):
  """(spec, arrays, BlockSpecs) of the MMA test tables; the spec loses `mma_tables` when
  there are none (over budget)."""
  if not spec.mma_tables:
    return spec, [], []
  built = mma_masks.tables(plan, spec, rows, loop_size, loop_is_kv)
  if built is None:
    return dataclasses.replace(spec, mma_tables=False), [], []
  tables, table_ids = built
  tables = jnp.where(jnp.asarray(tables), 0.0, spec.mma_value).astype(jnp.bfloat16)
  return spec, [tables, jnp.asarray(table_ids)], [
      pl.BlockSpec(tables.shape, lambda i, j: (0, 0, 0)),
      pl.BlockSpec((None, table_ids.shape[1]), lambda i, j: (i, 0))]


def _run_groups(spec: mma_masks.MaskSpec, counts_ref, sub: int, body, carry):
  """Full blocks (no element mask unless segments), then each partial group with its dims.

  counts_ref: [n_full, total, end of group 1, ..., end of group G] for this row."""
  if spec.single_loop:
    return jax.lax.fori_loop(0, counts_ref[1] * sub, functools.partial(
        body, masked=True, dims=None), carry)
  start = counts_ref[0] * sub
  carry = jax.lax.fori_loop(0, start, functools.partial(
      body, masked=spec.has_segments and not spec.segments_full, dims=()), carry)
  for g, dims in enumerate(spec.partial_groups):
    # Without splitting, the one partial loop runs to the row's total count.
    end = (counts_ref[2 + g] if len(spec.partial_groups) > 1 else counts_ref[1]) * sub
    carry = jax.lax.fori_loop(start, end, functools.partial(body, masked=True, dims=dims), carry)
    start = end
  return carry


def _tile_mask(spec: mma_masks.MaskSpec, refs, q_start, kv_start, tq: int, tk: int,
               transposed: bool = False, dims=None):
  """Boolean [tq, tk] (or [tk, tq] if `transposed`): interval dims AND mask_fn AND segments.

  `dims`: the interval dims to test (None = all); the block map guarantees the others pass.
  """
  q_lo, q_hi, kv_c, q_seg, kv_seg = refs
  # Broadcast a per-query vector along rows (or columns when transposed), same for keys.
  qv = (lambda x: x[None, :]) if transposed else (lambda x: x[:, None])
  kv = (lambda x: x[:, None]) if transposed else (lambda x: x[None, :])

  def test(d):
    lo = qv(q_lo[d][pl.ds(q_start, tq)])
    hi = qv(q_hi[d][pl.ds(q_start, tq)])
    c = kv(kv_c[d][pl.ds(kv_start, tk)])
    if spec.unsigned:  # `hi` holds the width; empty intervals have lo = 2**30, width 0
      return (c - lo).astype(jnp.uint32) <= hi.astype(jnp.uint32)
    return (lo <= c) & (c <= hi)

  # A union's terms (`plan.intervals_per_term`) are tested whole; else `dims`, if given.
  out = any_term(test, range(spec.num_dims) if dims is None or spec.terms > 1 else dims,
                 spec.terms)
  if out is None:
    out = jnp.ones((tk, tq) if transposed else (tq, tk), jnp.bool_)
  if spec.mask_fn is not None:
    shape = (tk, tq) if transposed else (tq, tk)
    qi = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1 if transposed else 0)
    ki = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0 if transposed else 1)
    out = out & spec.mask_fn(qi, ki)
  if spec.has_segments:
    out = out & (qv(q_seg[pl.ds(q_start, tq)]) == kv(kv_seg[pl.ds(kv_start, tk)]))
  return out


# MMA-bias masks (neighborhood masks on tiled layouts). A GNA test along one dim compares a
# key's coordinate with an interval that depends on the query's coordinate along that dim,
# and a spatial tile has few distinct coordinates per dim (8 + 8 for an 8x8 tile). With one
# column u per (dim, coordinate) of the program's own tile (the default, "rows"):
#   bias[r, l] = sum_u onehot[r, u] * test[u, l],
#   onehot[r, u] = 1 if column u is row r's coordinate along u's dim (constant per program),
#   test[u, l]   = 0 if the pair (coordinate u, loop element l) passes u's dim,
#                  else -2**20 / qk_scale,
# is 0 exactly when every dim passes. Per loop tile the test runs on [W, tile] instead of
# [rows, tile] and the matmul (K = W) runs on the tensor cores; the bias joins the scores
# before the scale (no select). Dims where the one-hot tile has one coordinate give one test
# per loop element, folded into the first column dim. ``mma_onehot="loop"`` swaps the roles
# (one-hot over the visited tile, test on [rows, W]). With static maps the test matrices come
# from deduplicated tables built on the host (`mma_masks.tables`), and "auto" takes the side with
# fewer columns; computing them in the loop, "rows" measured faster.


class _MMABias:
  """The MMA bias of one program: loop-invariant parts at construction, one call per step.

  Rows are the program's own tile (queries in forward/dQ, keys in dK/dV); the loop visits
  tiles of the other side. The interval test is ``(c - lo) <=u width`` with c a key
  coordinate and (lo, width) a query interval. With ``spec.mma_onehot_rows`` the one-hot
  describes the rows' tile: bias = onehot [rows, W] @ test [W, loop]; otherwise the loop's:
  bias = test [rows, W] @ onehot [W, loop]."""

  def __init__(self, spec: mma_masks.MaskSpec, refs, tables, row_start, rows: int, loop_size: int,
               loop_is_kv: bool):
    self.spec, self.refs, self.loop_is_kv = spec, refs, loop_is_kv
    self.rows, self.loop_size = rows, loop_size
    self.tables, self.table_ids = tables
    self.onehot_rows = spec.mma_onehot_rows
    w = spec.mma_width
    u = jax.lax.broadcasted_iota(jnp.int32, (w,), 0)
    dim = jnp.full((w,), -1, jnp.int32)
    rel = jnp.zeros((w,), jnp.int32)
    for d, (offset, extent, stride) in enumerate(spec.mma_cols):
      if offset >= 0:
        inside = (u >= offset) & (u < offset + extent)
        dim = jnp.where(inside, d, dim)
        rel = jnp.where(inside, (u - offset) * stride, rel)
    self.col_dims, self.folded = mma_masks.column_dims(spec.mma_cols)
    self.dim, self.rel = dim, rel
    self.first = dim == self.col_dims[0]  # the columns folded dims join
    self.onehot = self._onehot(rows if self.onehot_rows else loop_size)
    q_lo, q_hi, kv_c = refs[:3]
    if spec.mma_tables:
      return
    if self.onehot_rows:
      # Each column's value, read at a representative row: [W] vectors (scalars if folded).
      idx = row_start + rel
      if loop_is_kv:  # rows are queries: intervals
        self.col = (self._pick({d: q_lo[d][idx] for d in self.col_dims}),
                    self._pick({d: q_hi[d][idx] for d in self.col_dims}))
        self.fold = {f: (q_lo[f][row_start], q_hi[f][row_start]) for f in self.folded}
      else:  # rows are keys: coordinates
        self.col = self._pick({d: kv_c[d][idx] for d in self.col_dims})
        self.fold = {f: kv_c[f][row_start] for f in self.folded}
    else:
      # The rows' own values per column, [rows, W] (and [rows] per folded dim).
      rows_ds = pl.ds(row_start, rows)
      per_col = lambda vecs: self._pick({d: vecs[d][rows_ds][:, None] for d in self.col_dims},
                                        self.dim[None, :])
      if loop_is_kv:
        self.row = (per_col(q_lo), per_col(q_hi))
        self.fold = {f: (q_lo[f][rows_ds], q_hi[f][rows_ds]) for f in self.folded}
      else:
        self.row = per_col(kv_c)
        self.fold = {f: kv_c[f][rows_ds] for f in self.folded}

  def _onehot(self, size: int):
    """[size, W] (one-hot of the rows) or [W, size] (of the loop tile), bf16."""
    w = self.spec.mma_width
    shape = (size, w) if self.onehot_rows else (w, size)
    u = jax.lax.broadcasted_iota(jnp.int32, shape, 1 if self.onehot_rows else 0)
    e = jax.lax.broadcasted_iota(jnp.int32, shape, 0 if self.onehot_rows else 1)
    hit = None
    for offset, extent, stride in self.spec.mma_cols:
      if offset >= 0:
        coord = jax.lax.rem(jax.lax.div(e, jnp.full(shape, stride, jnp.int32)),
                            jnp.full(shape, extent, jnp.int32))
        term = (u - offset) == coord
        hit = term if hit is None else hit | term
    return jnp.where(hit, 1.0, 0.0).astype(jnp.bfloat16)

  def _pick(self, per_dim, dim=None):
    """Select per column between per-dim values (broadcasting against `dim`)."""
    dim = self.dim if dim is None else dim
    out = per_dim[self.col_dims[0]]
    for d in self.col_dims[1:]:
      out = jnp.where(dim == d, per_dim[d], out)
    return out

  def __call__(self, loop_start, step):
    """Score bias [rows, loop tile] float32 for the loop tile starting at `loop_start`, the
    program's `step`-th."""
    if self.spec.mma_tables:
      return self._matmul(self.tables[self.table_ids[step]])
    q_lo, q_hi, kv_c = self.refs[:3]
    test = lambda c, lo, hi: (c - lo).astype(jnp.uint32) <= hi.astype(jnp.uint32)
    first = self.first
    if self.onehot_rows:  # test [W, loop]
      ds = pl.ds(loop_start, self.loop_size)
      per_col = lambda vecs: self._pick({d: vecs[d][ds][None, :] for d in self.col_dims},
                                        self.dim[:, None])
      if self.loop_is_kv:
        lo, hi = self.col
        ok = test(per_col(kv_c), lo[:, None], hi[:, None])
        fold = [test(kv_c[f][ds], *self.fold[f]) for f in self.folded]
      else:
        ok = test(self.col[:, None], per_col(q_lo), per_col(q_hi))
        fold = [test(self.fold[f], q_lo[f][ds], q_hi[f][ds]) for f in self.folded]
      if fold:
        ok = ok & (functools.reduce(jnp.logical_and, fold)[None, :] | ~first[:, None])
      return self._matmul(jnp.where(ok, 0.0, self.spec.mma_value).astype(jnp.bfloat16))
    idx = loop_start + self.rel  # test [rows, W]
    if self.loop_is_kv:
      c = self._pick({d: kv_c[d][idx] for d in self.col_dims})
      ok = test(c[None, :], *self.row)
      fold = [test(kv_c[f][loop_start], *self.fold[f]) for f in self.folded]
    else:
      lo = self._pick({d: q_lo[d][idx] for d in self.col_dims})
      hi = self._pick({d: q_hi[d][idx] for d in self.col_dims})
      ok = test(self.row, lo[None, :], hi[None, :])
      fold = [test(self.fold[f], q_lo[f][loop_start], q_hi[f][loop_start])
              for f in self.folded]
    if fold:
      ok = ok & (functools.reduce(jnp.logical_and, fold)[:, None] | ~first[None, :])
    return self._matmul(jnp.where(ok, 0.0, self.spec.mma_value).astype(jnp.bfloat16))

  def _matmul(self, test):
    """onehot [rows, W] @ test [W, loop], or test [rows, W] @ onehot [W, loop]."""
    return _dot(self.onehot, test, False) if self.onehot_rows else _dot(test, self.onehot, False)


def _dot(a, b, allow_tf32, trans_b=False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  precision = None
  if a.dtype == jnp.float32 and not allow_tf32:
    precision = jax.lax.Precision.HIGHEST
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             precision=precision)


# --------------------------------------------------------------------------------------------
# Rows: kernel positions -> rows of the q/k/v arrays.


def _rows(rows_ref, start, size):
  """Rows of kernel positions [start, start + size) and which are real: the contiguous slice
  (kernel-order arrays), or the gathered indices (caller-order arrays; -1 marks padding,
  which reads row 0 and is never written)."""
  if rows_ref is None:
    return pl.ds(start, size), None
  idx = rows_ref[pl.ds(start, size)]
  return jnp.maximum(idx, 0), idx >= 0


def _row_index(rows, dpad: int, head=None):
  """Indexer of rows x all columns: a slice, or (gathered rows) broadcast index arrays."""
  mid = () if head is None else (head,)
  if isinstance(rows, jax.Array):
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, dpad), 1)
    return (rows[:, None],) + mid + (cols,)
  return (rows,) + mid + (slice(None),)


def _load_rows(ref, rows, dmask, head=None):
  idx = _row_index(rows, ref.shape[-1], head)
  if dmask is None:
    return ref[idx]
  return plgpu.load(ref.at[idx], mask=dmask, other=0.0)


def _load_head_rows(ref, rows, head, group, dmask):
  return _load_rows(ref, rows, dmask, None if group == 1 else head)


def _load_tile(ref, rows, dmask):
  """The program's own tile: the whole block (kernel order) or gathered rows."""
  if rows is None:
    return ref[...] if dmask is None else plgpu.load(ref, mask=dmask, other=0.0)
  return _load_rows(ref, rows, dmask)


def _store_tile(ref, value, rows, ok, dmask):
  if rows is None:
    if dmask is None:
      ref[...] = value
    else:
      plgpu.store(ref, value, mask=dmask)
    return
  keep = ok[:, None] if dmask is None else ok[:, None] & dmask
  plgpu.store(ref.at[_row_index(_store_rows(ref, rows, ok), ref.shape[-1])], value,
              mask=jnp.broadcast_to(keep, value.shape))


def _store_rows(ref, rows, ok):
  """Padding rows point past the end: masked off on the GPU, and dropped (not clashing with
  row 0) by interpret mode's scatter."""
  return jnp.where(ok, rows, ref.shape[0])


def _block_start(ids_ref, t, sub: int, block: int, tile: int):
  """Start row of the t-th kernel tile of a map row (`sub` tiles per map block)."""
  if sub == 1:
    return ids_ref[t] * block
  # lax.div/rem: t >= 0, and Triton lowers them directly (jnp's floor division adds selects).
  return ids_ref[jax.lax.div(t, sub)] * block + jax.lax.rem(t, sub) * tile


def _split_refs(rest, spec: mma_masks.MaskSpec):
  """(q_rows, kv_rows) index refs (None unless gathered), mask refs, (tables, table ids) of
  the MMA bias (None unless `mma_tables`), the rest (outputs)."""
  rows = (None, None)
  if spec.gathered:
    rows, rest = tuple(rest[:2]), rest[2:]
  nd = spec.num_dims
  q_lo, q_hi, kv_c = rest[:nd], rest[nd:2 * nd], rest[2 * nd:3 * nd]
  q_seg = kv_seg = None
  n = 3 * nd
  if spec.has_segments:
    q_seg, kv_seg = rest[n], rest[n + 1]
    n += 2
  tables = (None, None)
  if spec.mma_tables:
    tables = tuple(rest[n:n + 2])
    n += 2
  return rows, (q_lo, q_hi, kv_c, q_seg, kv_seg), tables, rest[n:]


def _head_dim_mask(dpad: int, head_dim: int):
  return (jnp.arange(dpad) < head_dim)[None, :] if dpad != head_dim else None


# --------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, *rest, spec: mma_masks.MaskSpec,
                scale: float, block_q: int, block_kv: int, tq: int, tk: int, head_dim: int,
                allow_tf32: bool, sink_heads: int = 0, softcap: float | None = None):
  """``sink_heads`` > 0: the first of `rest` holds a learned sink logit per head (grid axis 1
  runs over batch x `sink_heads` heads), joined to each row's softmax in the epilogue.
  `softcap`: scores soft-capped before the mask (`softcap.capped2`)."""
  sinks_ref, rest = (rest[0], rest[1:]) if sink_heads else (None, rest)
  (q_rows_ref, kv_rows_ref), mask_refs, tables, (o_ref, lse_ref) = _split_refs(rest, spec)
  q_start = pl.program_id(0) * tq
  dmask = _head_dim_mask(q_ref.shape[-1], head_dim)
  q_rows, q_ok = _rows(q_rows_ref, q_start, tq) if spec.gathered else (None, None)
  q = _load_tile(q_ref, q_rows, dmask)
  qk_scale = scale * LOG2E
  sub = block_kv // tk  # kernel tiles per block-map block: one flat loop keeps pipelining
  mma = spec.mma_cols is not None
  bias = _MMABias(spec, mask_refs, tables, q_start, tq, tk, loop_is_kv=True) if mma else None

  def body(t, carry, masked, dims):
    acc, m_prev, l_prev = carry
    kv_start = pl.multiple_of(_block_start(ids_ref, t, sub, block_kv, tk), tk)
    kv_rows, _ = _rows(kv_rows_ref, kv_start, tk)
    k = _load_rows(k_ref, kv_rows, dmask)
    s = _dot(q, k, allow_tf32, trans_b=True)
    if masked and mma:
      s = capped2((s + bias(kv_start, t)) * qk_scale, softcap, floor=True)
    else:
      s = capped2(s * qk_scale, softcap)
      if masked:
        s = jnp.where(_tile_mask(spec, mask_refs, q_start, kv_start, tq, tk, dims=dims), s,
                      -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked and not mma else m_new
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m_prev - m_safe)
    v = _load_rows(v_ref, kv_rows, dmask)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, allow_tf32)
    return acc, m_new, l_prev * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros((tq, q.shape[-1]), jnp.float32), jnp.full((tq,), -jnp.inf, jnp.float32),
          jnp.zeros((tq,), jnp.float32))
  acc, m, l = _run_groups(spec, counts_ref, sub, body, init)
  seen = (m > 0.5 * mma_masks.MASKED) if mma else (l > 0)
  l_safe = jnp.where(seen, l, 1.0)
  lse2 = jnp.where(seen, m + jnp.log2(l_safe), -jnp.inf)
  if sinks_ref is not None:  # acc / l * share: l / share is inf where share = 0
    sink2 = sinks_ref[pl.program_id(1) % sink_heads] * LOG2E
    lse2, share = join_sink(lse2, sink2, seen, jnp.exp2, jnp.log2)
    l_safe = l_safe / share
  out = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse = lse2 * LN2
  _store_tile(o_ref, out, q_rows, q_ok, dmask)
  if q_rows is None:
    lse_ref[...] = lse
  else:
    plgpu.store(lse_ref.at[_store_rows(lse_ref, q_rows, q_ok)], lse, mask=q_ok)


def _mask_inputs(plan: AttentionPlan, q_seg, kv_seg, b_of, spec: mma_masks.MaskSpec, rows: int,
                 loop_size: int, loop_is_kv: bool):
  """(spec, arrays, BlockSpecs) for the row indices (gathered), mask vectors, segments and
  MMA test tables of a kernel whose programs own `rows` and loop over `loop_size` (see
  `mma_masks.mask_spec`); `b_of(j)` maps grid axis 1 to the batch. The spec loses `mma_tables` when
  the tables are over budget."""
  spec, table_arrays, table_specs = _table_inputs(plan, spec, rows, loop_size, loop_is_kv)
  arrays, specs = [], []
  vectors = [plan.q_rows, plan.kv_rows] if spec.gathered else []
  q_lo, q_hi = mma_masks.unsigned_intervals(plan) if spec.unsigned else (plan.q_lo, plan.q_hi)
  for vec in (q_lo, q_hi, plan.kv_c):
    vectors += list(vec)
  for vec in vectors:
    arrays.append(jnp.asarray(vec, jnp.int32))
    specs.append(pl.BlockSpec((vec.shape[0],), lambda i, j: (0,)))
  if q_seg is not None:
    for seg in (q_seg, kv_seg):
      arrays.append(seg)
      specs.append(pl.BlockSpec((None, seg.shape[1]), lambda i, j: (b_of(j), 0)))
  return spec, arrays + table_arrays, specs + table_specs  # the order `_split_refs` reads


def _counts_array(counts, full_counts, group_ends):
  """[..., rows, pow2 >= 2 + groups]: n_full, total, then the end of each partial group."""
  cols = [jnp.asarray(full_counts, jnp.int32)[..., None],
          jnp.asarray(counts, jnp.int32)[..., None], jnp.asarray(group_ends, jnp.int32)]
  arr = jnp.concatenate(cols, axis=-1)
  width = pl.next_power_of_2(arr.shape[-1])
  return jnp.pad(arr, [(0, 0)] * (arr.ndim - 1) + [(0, width - arr.shape[-1])])


def _map_inputs(ids, counts, full_counts, group_ends, sub: int, group: int = 0,
                grid_heads: int = 1):
  """The block map rows (ids, counts) and their BlockSpecs for a grid over kernel tiles.

  Runtime maps (`BlockMap.is_runtime`: [batch, heads, rows, ...]) give each program its
  (batch, head)'s row, grid axis 1 running over batch x heads; with ``group`` (dK/dV) over
  batch x kv heads, each program gets the rows of its GQA group's query heads: [group, ...].
  Rows shared by every head ([batch, 1, rows, ...], `BlockMap.shares_heads`): each program
  its batch element's row, grid axis 1 running over batch x `grid_heads`."""
  counts = _counts_array(counts, full_counts, group_ends)
  ids = jnp.asarray(ids)
  if ids.ndim == 2:
    return ([ids, counts],
            [pl.BlockSpec((None, ids.shape[1]), lambda i, j: (i // sub, 0)),
             pl.BlockSpec((None, counts.shape[1]), lambda i, j: (i // sub, 0))])
  b, h, rows = ids.shape[:3]
  if h == 1:  # one row per batch element
    flat = lambda x: x.reshape(b, rows, x.shape[-1])
    spec = lambda x: pl.BlockSpec((None, None, x.shape[-1]),
                                  lambda i, j: (j // grid_heads, i // sub, 0))
    return [flat(ids), flat(counts)], [spec(ids), spec(counts)]
  if not group:
    flat = lambda x: x.reshape(b * h, rows, x.shape[-1])
    spec = lambda x: pl.BlockSpec((None, None, x.shape[-1]), lambda i, j: (j, i // sub, 0))
  else:
    flat = lambda x: x.reshape(b * h // group, group, rows, x.shape[-1])
    spec = lambda x: pl.BlockSpec((None, group, None, x.shape[-1]),
                                  lambda i, j: (j, 0, i // sub, 0))
  return [flat(ids), flat(counts)], [spec(ids), spec(counts)]


def _pad_head_dim(*xs):
  d = xs[0].shape[-1]
  dpad = _padded_head_dim(d)
  if dpad == d:
    return xs
  return tuple(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dpad - d)]) for x in xs)


def _tile_spec(spec: mma_masks.MaskSpec, n: int, tile: int, dpad: int, index):
  """BlockSpec of a [batch, n, heads, dpad] array for a program's own tile: its block
  (kernel order), or the whole sequence of its (batch, head), read by gathered rows.
  `index(j) -> (batch, head)`."""
  if spec.gathered:
    return pl.BlockSpec((None, n, None, dpad), lambda i, j: (index(j)[0], 0, index(j)[1], 0))
  return pl.BlockSpec((None, tile, None, dpad), lambda i, j: (index(j)[0], i, index(j)[1], 0))


def _vector_spec(spec: mma_masks.MaskSpec, n: int, tile: int, index):
  """BlockSpec of a [batch, heads, n] per-query vector (lse, delta) for a program's tile."""
  if spec.gathered:
    return pl.BlockSpec((None, None, n), lambda i, j: (index(j)[0], index(j)[1], 0))
  return pl.BlockSpec((None, None, tile), lambda i, j: (index(j)[0], index(j)[1], i))


def forward(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, config, interpret,
            block_map=None, sinks=None, softcap=None):
  """q [batch, n_q, heads, head_dim], k/v [batch, n_kv, kv_heads, head_dim]: kernel order
  (n = padded length), or the caller's flat order if ``plan.gathered``. Returns out like q
  and lse [batch, heads, n_q] float32. `block_map`: a runtime map (per batch and head)
  instead of the plan's. `sinks`: learned sink logits [heads] float32, joined to every
  row's softmax in the epilogue (`merge.join_sink`). `softcap`: logit soft-capping
  (`softcap.capped`)."""
  check_available()
  plan = intervals_per_term(plan, UNION_TERMS)
  b, sq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  cfg = default_config(d, q.dtype, plan, config)
  tq, tk = cfg.block_q, cfg.block_kv
  bmap = walked_map(plan, block_map)
  spec = mma_masks.mask_spec(plan, q_seg is not None, cfg, tq, tk, scale, forward=True,
                             segments_full=bmap.segments_full)
  qp, kp, vp = _pad_head_dim(q, k, v)
  dpad = qp.shape[-1]
  skv = k.shape[1]
  spec, mask_arrays, mask_specs = _mask_inputs(plan, q_seg, kv_seg, lambda j: j // h, spec,
                                               tq, tk, True)
  map_arrays, map_specs = _map_inputs(bmap.kv_ids, bmap.kv_counts, bmap.kv_full_counts,
                                      bmap.kv_group_ends, plan.block_q // tq, grid_heads=h)
  kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, block_q=plan.block_q,
                             block_kv=plan.block_kv, tq=tq, tk=tk, head_dim=d,
                             allow_tf32=cfg.allow_tf32, sink_heads=h if sinks is not None else 0,
                             softcap=softcap)
  bh = lambda j: (j // h, j % h)
  kv_full = pl.BlockSpec((None, skv, None, dpad), lambda i, j: (j // h, 0, (j % h) // g, 0))
  sink_arrays, sink_specs = [], []
  if sinks is not None:  # padded to a power of two (Triton's block shapes)
    sink_arrays = [jnp.pad(sinks.astype(jnp.float32), (0, pl.next_power_of_2(h) - h))]
    sink_specs = [pl.BlockSpec((sink_arrays[0].shape[0],), lambda i, j: (0,))]
  out, lse = pl.pallas_call(
      kernel,
      grid=(plan.q_layout.padded_len // tq, b * h),
      in_specs=(map_specs + [_tile_spec(spec, sq, tq, dpad, bh), kv_full, kv_full] + sink_specs
                + mask_specs),
      out_specs=[_tile_spec(spec, sq, tq, dpad, bh), _vector_spec(spec, sq, tq, bh)],
      out_shape=[jax.ShapeDtypeStruct((b, sq, h, dpad), q.dtype),
                 jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="sparse_attention_fwd",
  )(*map_arrays, qp, kp, vp, *sink_arrays, *mask_arrays)
  return out[..., :d], lse


# --------------------------------------------------------------------------------------------
# Backward: dQ.


def _dq_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               spec, scale, block_q, block_kv, tq, tk, head_dim, allow_tf32, softcap=None):
  (q_rows_ref, kv_rows_ref), mask_refs, tables, (dq_ref,) = _split_refs(rest, spec)
  q_start = pl.program_id(0) * tq
  dmask = _head_dim_mask(q_ref.shape[-1], head_dim)
  q_rows, q_ok = _rows(q_rows_ref, q_start, tq) if spec.gathered else (None, None)
  q = _load_tile(q_ref, q_rows, dmask)
  do = _load_tile(do_ref, q_rows, dmask)
  lse = lse_ref[...] if q_rows is None else lse_ref[q_rows]
  delta = delta_ref[...] if q_rows is None else delta_ref[q_rows]
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  qk_scale = scale * LOG2E
  sub = block_kv // tk
  mma = spec.mma_cols is not None
  bias = _MMABias(spec, mask_refs, tables, q_start, tq, tk, loop_is_kv=True) if mma else None

  def body(t, dq, masked, dims):
    kv_start = pl.multiple_of(_block_start(ids_ref, t, sub, block_kv, tk), tk)
    kv_rows, _ = _rows(kv_rows_ref, kv_start, tk)
    k = _load_rows(k_ref, kv_rows, dmask)
    v = _load_rows(v_ref, kv_rows, dmask)
    s = _dot(q, k, allow_tf32, trans_b=True)
    if masked and mma:
      s = s + bias(kv_start, t)
    s = capped2(s * qk_scale, softcap, floor=masked and mma)
    p = jnp.exp2(s - lse2[:, None])
    if masked and not mma:
      p = jnp.where(_tile_mask(spec, mask_refs, q_start, kv_start, tq, tk, dims=dims), p, 0.0)
    dp = _dot(do, v, allow_tf32, trans_b=True)
    ds = p * (dp - delta[:, None])
    if softcap is not None:  # through the cap
      ds = ds * slope2(s, softcap)
    return dq + _dot(ds.astype(k.dtype), k, allow_tf32)

  dq = _run_groups(spec, counts_ref, sub, body, jnp.zeros((tq, q.shape[-1]), jnp.float32))
  _store_tile(dq_ref, (dq * scale).astype(dq_ref.dtype), q_rows, q_ok, dmask)


# --------------------------------------------------------------------------------------------
# Backward: dK/dV.


class _HeadRow:
  """Row `head` of a per-head map ref [group, n]: ``row[i]`` reads ``ref[head, i]`` (one
  indexer: the Triton lowering takes no view of a view)."""

  def __init__(self, ref, head: int):
    self.ref, self.head = ref, head

  def __getitem__(self, i):
    return self.ref[self.head, i]


def _dkv_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                spec, scale, block_q, block_kv, tq, tk, head_dim, group, allow_tf32,
                per_head: bool = False, softcap: float | None = None):
  """per_head: a runtime map, rows [group, ...] (one per query head of the GQA group);
  `softcap`: scores soft-capped (`softcap.capped2`)."""
  (q_rows_ref, kv_rows_ref), mask_refs, tables, (dk_ref, dv_ref) = _split_refs(rest, spec)
  kv_start = pl.program_id(0) * tk
  dmask = _head_dim_mask(k_ref.shape[-1], head_dim)
  kv_rows, kv_ok = _rows(kv_rows_ref, kv_start, tk) if spec.gathered else (None, None)
  k = _load_tile(k_ref, kv_rows, dmask)
  v = _load_tile(v_ref, kv_rows, dmask)
  qk_scale = scale * LOG2E
  sub = block_q // tq
  mma = spec.mma_cols is not None
  bias = (_MMABias(spec, mask_refs, tables, kv_start, tk, tq, loop_is_kv=False) if mma
          else None)

  def body(t, carry, masked, dims, head, ids):
    head = jnp.int32(head)  # a traced index (static ints trip the interpret-mode discharge)
    dk, dv = carry
    q_start = pl.multiple_of(_block_start(ids, t, sub, block_q, tq), tq)
    rows, ok = _rows(q_rows_ref, q_start, tq)
    q = _load_head_rows(q_ref, rows, head, group, dmask)
    do = _load_head_rows(do_ref, rows, head, group, dmask)
    lse = lse_ref[head, rows] if group > 1 else lse_ref[rows]
    delta = delta_ref[head, rows] if group > 1 else delta_ref[rows]
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    if ok is not None:  # padding rows read row 0: make their P zero
      lse2 = jnp.where(ok, lse2, jnp.inf)
    # Work in the transposed domain (rows = keys) so every dot is A @ B or A @ B^T.
    s_t = _dot(k, q, allow_tf32, trans_b=True)  # [tk, tq]
    if masked and mma:
      s_t = s_t + bias(q_start, t)
    s_t = capped2(s_t * qk_scale, softcap, floor=masked and mma)
    p_t = jnp.exp2(s_t - lse2[None, :])
    if masked and not mma:
      p_t = jnp.where(_tile_mask(spec, mask_refs, q_start, kv_start, tq, tk, transposed=True,
                                 dims=dims), p_t, 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do, allow_tf32)
    dp_t = _dot(v, do, allow_tf32, trans_b=True)
    ds_t = p_t * (dp_t - delta[None, :])
    if softcap is not None:  # through the cap
      ds_t = ds_t * slope2(s_t, softcap)
    dk = dk + _dot(ds_t.astype(q.dtype), q, allow_tf32)
    return dk, dv

  carry = (jnp.zeros((tk, k.shape[-1]), jnp.float32), jnp.zeros((tk, k.shape[-1]), jnp.float32))
  for head in range(group):  # GQA: the query heads sharing this KV head
    ids, counts = ((_HeadRow(ids_ref, head), _HeadRow(counts_ref, head)) if per_head
                   else (ids_ref, counts_ref))
    carry = _run_groups(spec, counts, sub, functools.partial(body, head=head, ids=ids), carry)
  dk, dv = carry
  _store_tile(dk_ref, (dk * scale).astype(dk_ref.dtype), kv_rows, kv_ok, dmask)
  _store_tile(dv_ref, dv.astype(dv_ref.dtype), kv_rows, kv_ok, dmask)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: AttentionPlan, scale: float,
             config, interpret, block_map=None, softcap=None):
  check_available()
  plan = intervals_per_term(plan, UNION_TERMS)
  b, sq, h, d = q.shape
  skv, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  cfg = default_config(d, q.dtype, plan, config)
  bmap = walked_map(plan, block_map)
  # delta = rowsum(dO * O) - dLSE: one fused elementwise pass.
  delta = backends.backward_delta(out, d_out, d_lse)  # [b, h, sq]
  qp, kp, vp, dop = _pad_head_dim(q, k, v, d_out)
  dpad = qp.shape[-1]

  # dQ over the forward map.
  tq, tk = cfg.dq_block_q, cfg.dq_block_kv
  spec = mma_masks.mask_spec(plan, q_seg is not None, cfg, tq, tk, scale,
                             segments_full=bmap.segments_full)
  spec, mask_arrays, mask_specs = _mask_inputs(plan, q_seg, kv_seg, lambda j: j // h, spec,
                                               tq, tk, True)
  map_arrays, map_specs = _map_inputs(bmap.kv_ids, bmap.kv_counts, bmap.kv_full_counts,
                                      bmap.kv_group_ends, plan.block_q // tq, grid_heads=h)
  bh = lambda j: (j // h, j % h)
  q_spec = _tile_spec(spec, sq, tq, dpad, bh)
  row_spec = _vector_spec(spec, sq, tq, bh)
  kv_full = pl.BlockSpec((None, skv, None, dpad), lambda i, j: (j // h, 0, (j % h) // g, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, scale=scale, block_q=plan.block_q,
                        block_kv=plan.block_kv, tq=tq, tk=tk, head_dim=d,
                        allow_tf32=cfg.allow_tf32, softcap=softcap),
      grid=(plan.q_layout.padded_len // tq, b * h),
      in_specs=map_specs + [q_spec, kv_full, kv_full, q_spec, row_spec, row_spec] + mask_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, sq, h, dpad), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=cfg.dq_num_warps,
                                           num_stages=cfg.dq_num_stages),
      interpret=interpret, name="sparse_attention_dq",
  )(*map_arrays, qp, kp, vp, dop, lse, delta, *mask_arrays)

  # dK/dV over the transposed map; the GQA group's query heads in one program.
  tq, tk = cfg.bwd_block_q, cfg.bwd_block_kv
  spec = mma_masks.mask_spec(plan, q_seg is not None, cfg, tk, tq, scale, loop_is_kv=False,
                             segments_full=bmap.segments_full)
  spec, mask_arrays, mask_specs = _mask_inputs(plan, q_seg, kv_seg, lambda j: j // hkv, spec,
                                               tk, tq, False)
  map_arrays, map_specs = _map_inputs(bmap.q_ids, bmap.q_counts, bmap.q_full_counts,
                                      bmap.q_group_ends, plan.block_kv // tk, group=g,
                                      grid_heads=hkv)
  if g == 1:
    q_all = pl.BlockSpec((None, sq, None, dpad), lambda i, j: (j // hkv, 0, j % hkv, 0))
    rows_all = pl.BlockSpec((None, None, sq), lambda i, j: (j // hkv, j % hkv, 0))
  else:
    q_all = pl.BlockSpec((None, sq, g, dpad), lambda i, j: (j // hkv, 0, j % hkv, 0))
    rows_all = pl.BlockSpec((None, g, sq), lambda i, j: (j // hkv, j % hkv, 0))
  kv_spec = _tile_spec(spec, skv, tk, dpad, lambda j: (j // hkv, j % hkv))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, scale=scale, block_q=plan.block_q,
                        block_kv=plan.block_kv, tq=tq, tk=tk, head_dim=d, group=g,
                        allow_tf32=cfg.allow_tf32, softcap=softcap,
                        per_head=bmap.is_runtime and not bmap.shares_heads),
      grid=(plan.kv_layout.padded_len // tk, b * hkv),
      in_specs=map_specs + [q_all, kv_spec, kv_spec, q_all, rows_all, rows_all] + mask_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, skv, hkv, dpad), k.dtype),
                 jax.ShapeDtypeStruct((b, skv, hkv, dpad), v.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.bwd_num_warps,
                                           num_stages=cfg.bwd_num_stages),
      interpret=interpret, name="sparse_attention_dkv",
  )(*map_arrays, qp, kp, vp, dop, lse, delta, *mask_arrays)
  return dq[..., :d], dk[..., :d], dv[..., :d]


# --------------------------------------------------------------------------------------------
# Lowering without a GPU (CI).


def export_for_gpu(fn, *args, device_kind: str = "NVIDIA H100 80GB HBM3"):
  """Export jitted `fn` for CUDA on a machine with no GPU: runs the Pallas -> Triton and
  Pallas -> Mosaic GPU lowering of every kernel (compiling to PTX happens on the GPU).
  Args: ShapeDtypeStructs."""
  from jax._src import mesh as mesh_lib
  device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  checks = [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")]
  with jax.sharding.use_abstract_mesh(mesh), backends.target("gpu"):
    return jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(*args)
