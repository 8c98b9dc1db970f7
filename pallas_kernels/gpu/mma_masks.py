"""MMA-bias masks of neighborhood partial blocks, shared by the GPU kernels (Triton and
Mosaic GPU).

A GNA interval along one dim depends only on the query's coordinate along that dim, so for
a tile of queries the mask of a block pair is ``onehot[rows, W] @ test[W, cols]``: one
column per (dim, coordinate) of the one-hot side, ``test[u, j]`` = 0 if element j passes
column u's interval, else the masked value. `mask_spec` decides per kernel whether the
bias applies (tiled layouts, W <= `MAX_WIDTH`), `tables` builds the deduplicated test
matrices of every masked step on the host.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from jax.experimental import pallas as pl

from jax_sparse_attn.layout import TiledLayout
from jax_sparse_attn.plan import AttentionPlan

LOG2E = math.log2(math.e)

# MMA-bias masks put masked scores near -2**20 (log2 units): exp2 of that is exactly 0 against
# any real row max, and a row whose max stays below half of it has seen no key.
MASKED = -2.0 ** 20
MAX_WIDTH = 32


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  num_dims: int
  mask_fn: object  # Mask or None, evaluated on positions (sequence layouts only)
  has_segments: bool
  partial_groups: tuple = (None,)  # per partial group, the interval dims to test
  single_loop: bool = False
  unsigned: bool = False  # q vectors hold (lo, hi - lo) for the unsigned test
  gathered: bool = False  # q/k/v/outputs in the caller's token order, rows via index vectors
  # MMA-bias masks (`triton_attention._MMABias`): per interval dim, (column offset or -1 if
  # folded, extent, row stride) of the loop side's kernel tile inside its spatial map tile;
  # the padded column count; the bias operand of a masked pair. None: element masks.
  mma_cols: tuple | None = None
  mma_width: int = 0
  mma_value: float = 0.0
  mma_onehot_rows: bool = True
  mma_tables: bool = False  # the test matrices come from `tables` (two extra inputs)
  # Full blocks hold one segment id on both sides (a runtime map from segment ids,
  # `BlockMap.segments_full`): no segment test there.
  segments_full: bool = False
  # The interval dims are `terms` terms of num_dims // terms dims, OR'ed
  # (`plan.intervals_per_term`).
  terms: int = 1


def onehot_columns(tile_shape, rows: int):
  """Columns of the MMA bias for an aligned chunk of `rows` rows of a row-major spatial tile.

  Tile extents are powers of two (their product is), so the chunk is a box: per dim its
  extent and the row stride of one step along it. Column ``offset + a`` stands for "this
  dim's coordinate is a" (relative to the chunk). Dims of extent 1 get no columns (offset -1):
  their test is one value per row, folded into the first column dim. Returns (cols, width)
  with the width padded to a power of two >= 16 (the smallest matmul K)."""
  nd = len(tile_shape)
  extents, left = [1] * nd, rows
  for d in reversed(range(nd)):
    extents[d] = min(tile_shape[d], left)
    left //= extents[d]
  keep = [d for d in range(nd) if extents[d] > 1] or [nd - 1]
  cols, offset = [], 0
  for d in range(nd):
    stride = math.prod(tile_shape[d + 1:])
    if d in keep:
      cols.append((offset, extents[d], stride))
      offset += extents[d]
    else:
      cols.append((-1, 1, stride))
  return tuple(cols), max(16, pl.next_power_of_2(offset))


def bias_fits(tile_shape, rows: int) -> bool:
  """Whether an aligned chunk of `rows` rows of this tile takes the MMA bias: its one-hot
  columns (`onehot_columns`) within `MAX_WIDTH`, else the kernels test elements."""
  return onehot_columns(tile_shape, rows)[1] <= MAX_WIDTH


def column_dims(cols):
  """(dims with bias columns, dims folded into the first of them) of `columns` output."""
  return ([d for d, c in enumerate(cols) if c[0] >= 0], [d for d, c in enumerate(cols) if c[0] < 0])


def mask_spec(plan: AttentionPlan, has_segments: bool, cfg, rows: int, loop_rows: int,
              scale: float, loop_is_kv: bool = True, forward: bool = False,
              segments_full: bool = False) -> MaskSpec:
  """Mask handling of one kernel: its programs own tiles of `rows` queries (forward, dQ) or
  keys (dK/dV, ``loop_is_kv=False``) and loop over tiles of `loop_rows` of the other side.
  `cfg`: a `triton_attention.TritonConfig` (its mask fields). `segments_full`: the walked
  map's full blocks need no segment test (`BlockMap.segments_full`)."""
  groups = tuple(plan.block_map.partial_groups) if cfg.split_partial_groups else (None,)
  cols, width, value, onehot_rows, tables = None, 0, 0.0, True, False
  tiled = isinstance(plan.q_layout, TiledLayout) and isinstance(plan.kv_layout, TiledLayout)
  if (cfg.mask_mma and tiled and plan.mask_fn is None and not has_segments
      and cfg.unsigned_intervals and abs(scale) * LOG2E > 2.0 ** -60):
    tables = cfg.mask_tables and isinstance(plan.block_map.kv_ids, np.ndarray)

    def columns(onehot_rows):  # the one-hot side's tile: the program's own or the visited one
      layout = plan.q_layout if loop_is_kv == onehot_rows else plan.kv_layout
      return onehot_columns(layout.tile_shape, rows if onehot_rows else loop_rows)

    if cfg.mma_onehot == "auto":  # computed tests: rows (measured faster); tables: narrower
      onehot_rows = not tables or columns(True)[1] <= columns(False)[1]
    else:
      onehot_rows = cfg.mma_onehot == "rows"
    cols, width = columns(onehot_rows)
    value = MASKED / (scale * LOG2E)  # scaled by qk_scale in-kernel: -2**20
    if width > MAX_WIDTH:
      cols, width, tables = None, 0, False
  single_loop = cfg.single_loop
  if single_loop is None:
    single_loop = forward and tables and rows >= 128
  return MaskSpec(plan.num_mask_dims, plan.mask_fn, has_segments, groups, single_loop,
                  cfg.unsigned_intervals, plan.gathered, cols, width, value, onehot_rows,
                  tables, segments_full and has_segments, plan.terms)


# Distinct pairs x bias columns x loop elements evaluated on the host for one set of tables;
# beyond it the kernels compute the test matrices in the loop instead.
TABLE_BUDGET = 1 << 27


def unsigned_intervals(plan: AttentionPlan):
  """(lo, hi - lo) per query, empty intervals as (2**30, 0): the unsigned test's operands."""
  empty = plan.q_hi < plan.q_lo
  return (np.where(empty, 1 << 30, plan.q_lo), np.where(empty, 0, plan.q_hi - plan.q_lo))


@functools.lru_cache(maxsize=64)
def tables(plan: AttentionPlan, spec: MaskSpec, rows: int, loop_size: int, loop_is_kv: bool,
           dedup: bool = True):
  """The MMA bias's test matrices of every masked step, deduplicated, or None (over budget).
  ``dedup=False`` builds every pair's matrix before deduplicating (the reference the tests
  compare the keyed build with).

  Mirrors `triton_attention._MMABias.__call__` on the host. Returns (tables: bool, True
  where the pair passes the column's dim, [n, W, loop_size] with one-hot rows or [n, rows, W]
  with one-hot loop tiles; ids [programs, steps] int32: the table of step t of program i, 0
  if unmasked)."""
  bmap = plan.block_map
  if loop_is_kv:
    ids, counts, full = bmap.kv_ids, bmap.kv_counts, bmap.kv_full_counts
    block_rows, block_loop, n_rows = plan.block_q, plan.block_kv, plan.q_layout.padded_len
  else:
    ids, counts, full = bmap.q_ids, bmap.q_counts, bmap.q_full_counts
    block_rows, block_loop, n_rows = plan.block_kv, plan.block_q, plan.kv_layout.padded_len
  sub_rows, sub = block_rows // rows, block_loop // loop_size
  n_prog, steps = n_rows // rows, ids.shape[1] * sub
  row = np.arange(n_prog) // sub_rows
  t = np.arange(steps)[None, :]
  first_masked = 0 if spec.single_loop else full[row] * sub
  masked = (t >= np.asarray(first_masked).reshape(-1, 1)) & (t < counts[row][:, None] * sub)
  prog, step = np.nonzero(masked)
  w = spec.mma_width
  n_elems = loop_size if spec.mma_onehot_rows else rows
  row_start = prog * rows
  loop_start = ids[row[prog], step // sub] * block_loop + (step % sub) * loop_size
  # Columns (the one-hot side) and elements (the other side) of each table.
  col_start, elem_start = ((row_start, loop_start) if spec.mma_onehot_rows
                           else (loop_start, row_start))
  cols_are_queries = loop_is_kv == spec.mma_onehot_rows

  dim, rel = np.full(w, -1), np.zeros(w, np.int64)
  for d, (offset, extent, stride) in enumerate(spec.mma_cols):
    if offset >= 0:
      dim[offset:offset + extent] = d
      rel[offset:offset + extent] = np.arange(extent) * stride
  col_dims, folded = column_dims(spec.mma_cols)
  dsafe = np.where(dim >= 0, dim, col_dims[0])
  lo, width = (x.astype(np.int64) for x in unsigned_intervals(plan))
  coord = plan.kv_c.astype(np.int64)
  test = lambda c, lo, width: ((c - lo) & 0xFFFFFFFF) <= width

  def build(cs_all, es_all):
    """Packed test matrices [n, ceil(W * E / 8)] of the pairs (column start, element start)."""
    packed = []
    for c0 in range(0, len(cs_all), 4096):
      cs, es = cs_all[c0:c0 + 4096], es_all[c0:c0 + 4096]
      cols = cs[:, None] + rel[None, :]  # [n, W]: each column's representative position
      elems = es[:, None] + np.arange(n_elems)[None, :]  # [n, E]
      at_cols = lambda x: x[dsafe[None, :], cols][..., None]  # [n, W, 1]
      at_elems = lambda x: x[dsafe[None, :, None], elems[:, None, :]]  # [n, W, E]
      if cols_are_queries:
        ok = test(at_elems(coord), at_cols(lo), at_cols(width))
        fold = [test(coord[f][elems], lo[f][cs][:, None], width[f][cs][:, None])
                for f in folded]
      else:
        ok = test(at_cols(coord), at_elems(lo), at_elems(width))
        fold = [test(coord[f][cs][:, None], lo[f][elems], width[f][elems]) for f in folded]
      ok |= (dim < 0)[None, :, None]  # padding columns: the one-hot never selects them
      if fold:
        ok &= (functools.reduce(np.logical_and, fold)[:, None, :]
               | (dim != col_dims[0])[None, :, None])
      if not spec.mma_onehot_rows:
        ok = ok.transpose(0, 2, 1)  # [n, rows, W]: the matmul's A operand
      packed.append(np.packbits(ok.reshape(len(cs), -1), axis=1))
    size = w * n_elems
    return np.concatenate(packed) if packed else np.zeros((0, (size + 7) // 8), np.uint8)

  if dedup and len(prog):
    # The test is shift-invariant ((x - lo) mod 2**32): a pair's table depends only on its
    # operands relative to a base per dim, taken on the element side, so pairs whose
    # relative operands agree share one. Keys of O(W) ints per pair (elements: an id of
    # their block's relative pattern) find the distinct pairs; tables are built for one
    # pair per key, and TABLE_BUDGET bounds that work (3-D NA k8x16^2 at 32x128^2: 140k
    # masked pairs, 26 tables).
    elem_starts, es_inv = np.unique(elem_start, return_inverse=True)
    block = elem_starts[:, None] + np.arange(n_elems)[None, :]  # [U, E]
    if cols_are_queries:
      base = coord[:, elem_starts]  # [D, U]
      pattern = coord[:, block] - base[:, :, None]
    else:
      base = lo[:, elem_starts]
      pattern = np.concatenate([lo[:, block] - base[:, :, None], width[:, block]])
    pattern = np.ascontiguousarray(pattern.transpose(1, 0, 2).reshape(len(elem_starts), -1))
    _, pattern_id = unique_rows(pattern.view(np.uint8))
    pair_base = base[:, es_inv]  # [D, n]
    cols = col_start[:, None] + rel[None, :]
    n = np.arange(len(prog))
    col_base = pair_base[dsafe[None, :], n[:, None]]  # [n, W]
    if cols_are_queries:
      parts = [lo[dsafe[None, :], cols] - col_base, width[dsafe[None, :], cols]]
      parts += [(lo[f][col_start] - pair_base[f])[:, None] for f in folded]
      parts += [width[f][col_start][:, None] for f in folded]
    else:
      parts = [coord[dsafe[None, :], cols] - col_base]
      parts += [(coord[f][col_start] - pair_base[f])[:, None] for f in folded]
    key = np.ascontiguousarray(np.concatenate([pattern_id[es_inv][:, None]] + parts, axis=1),
                               dtype=np.int64)
    _, key_inv = unique_rows(key.view(np.uint8))
    first = np.full(int(key_inv.max(initial=-1)) + 1, len(prog), np.int64)
    np.minimum.at(first, key_inv, n)
    if len(first) * w * n_elems > TABLE_BUDGET:
      return None
    uniq, inverse = unique_rows(build(col_start[first], elem_start[first]))
    inverse = inverse[key_inv]
  else:  # every pair's table (the reference for the keys above)
    if len(prog) * w * n_elems > TABLE_BUDGET:
      return None
    uniq, inverse = unique_rows(build(col_start, elem_start))
  size = w * n_elems
  shape = (w, n_elems) if spec.mma_onehot_rows else (n_elems, w)
  tables = np.unpackbits(uniq, axis=1, count=size).astype(bool).reshape((-1,) + shape)
  if not len(tables):
    tables = np.ones((1,) + shape, bool)
  table_ids = np.zeros((n_prog, steps), np.int32)
  table_ids[prog, step] = inverse
  return tables, table_ids


def unique_rows(rows: np.ndarray):
  """np.unique(rows, axis=0, return_inverse=True) for uint8 rows, through a 64-bit hash per
  row (sorting the rows themselves is slow); a hash collision is detected and falls back."""
  words = np.pad(rows, ((0, 0), (0, -rows.shape[1] % 8))).view(np.uint64)
  mult = np.random.default_rng(0).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | 1
  with np.errstate(over="ignore"):
    keys = np.sum(words * mult, axis=1, dtype=np.uint64)  # mod 2**64
  _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  uniq = rows[first]
  if not np.array_equal(uniq[inverse.reshape(-1)], rows):
    uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
  return uniq, inverse.reshape(-1)
