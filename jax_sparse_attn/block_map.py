"""Block maps: for each Q block, the KV blocks it visits (full or partial), and the transpose.

This is the contract every backend consumes. Built once per (mask, layouts, block sizes) at
trace time with numpy, cached, and handed to kernels as small int32 arrays:

* ``kv_ids   [num_q_blocks, max_kv]``: visited KV block ids, **full blocks first**, then
  partial ones, each group ascending; the tail repeats the last valid id (a TPU grid step on a
  padding entry re-uses the block already in VMEM: no DMA).
* ``kv_counts [num_q_blocks]`` and ``kv_full_counts [num_q_blocks]``.
* ``q_ids / q_counts / q_full_counts``: the same for each KV block (the Q blocks that visit
  it), used by the dK/dV kernels.
* ``kv_group_ends / q_group_ends [rows, num_groups]``: partial blocks are further grouped by
  which mask dimensions are partial (``partial_groups[g]``: the dims to test, None = all), so
  kernels run one specialised loop per group: a 2-D neighborhood block that is full along
  rows and partial along columns tests only the column interval. Group g's entries end at
  ``group_ends[:, g]`` (the last group ends at ``counts``).

A *full* block needs no per-element mask (every pair attends, no padded key); a *partial*
block gets the exact element mask in-kernel. Visited blocks are never empty.

The fields are arrays (numpy here; jax arrays for content-routed maps built at run time), so
a `BlockMap` is a pytree with static block sizes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from . import masks as masks_lib
from .layout import SequenceLayout, TiledLayout

EMPTY, PARTIAL, FULL = 0, 1, 2

# Dense element evaluation budget (pairs) for exact refinement / generic masks.
_REFINE_BUDGET = 1 << 28


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv_ids", "kv_counts", "kv_full_counts", "kv_group_ends",
                                "q_ids", "q_counts", "q_full_counts", "q_group_ends"],
                   meta_fields=["block_q", "block_kv", "num_q_blocks", "num_kv_blocks",
                                "partial_groups", "segments_full"])
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMap:
  kv_ids: Any
  kv_counts: Any
  kv_full_counts: Any
  kv_group_ends: Any
  q_ids: Any
  q_counts: Any
  q_full_counts: Any
  q_group_ends: Any
  block_q: int
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int
  partial_groups: tuple = (None,)
  # A runtime map built with segment ids (`from_segments`): its full blocks pair one segment
  # with itself, so kernels skip the segment test there (they test it on partial blocks).
  segments_full: bool = False

  @property
  def max_kv(self) -> int:
    return self.kv_ids.shape[-1]

  @property
  def max_q(self) -> int:
    return self.q_ids.shape[-1]

  @property
  def is_runtime(self) -> bool:
    """A map built at run time per (batch, head): fields [batch, heads, rows, ...]
    (`from_selection`), or [batch, 1, rows, ...]: rows every head shares (`from_segments`)."""
    return self.kv_ids.ndim == 4

  @property
  def shares_heads(self) -> bool:
    """A runtime map whose rows are the same for every head (one per batch element)."""
    return self.is_runtime and self.kv_ids.shape[1] == 1

  @property
  def num_visited(self) -> int:
    return int(np.sum(self.kv_counts))

  @property
  def num_full(self) -> int:
    return int(np.sum(self.kv_full_counts))

  def dense_classes(self) -> np.ndarray:
    """[num_q_blocks, num_kv_blocks] of EMPTY/PARTIAL/FULL (for tests and plots; small maps)."""
    out = np.zeros((self.num_q_blocks, self.num_kv_blocks), np.int8)
    ids, counts, full = map(np.asarray, (self.kv_ids, self.kv_counts, self.kv_full_counts))
    for i in range(self.num_q_blocks):
      for j in range(counts[i]):
        out[i, ids[i, j]] = FULL if j < full[i] else PARTIAL
    return out


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (max(n, 1) - 1).bit_length())


def _pack_rows(rows_ids: list[np.ndarray], rows_group: list[np.ndarray], num_groups: int,
               pad_pow2: bool):
  """Per-row (ids, group: 0 full, g >= 1 partial group g) -> padded ids sorted by (group, id),
  counts, full counts and the cumulative end of each partial group."""
  n = len(rows_ids)
  counts = np.array([len(r) for r in rows_ids], np.int32)
  width = max(int(counts.max()) if n else 0, 1)
  if pad_pow2:
    width = _pow2_at_least(width)
  ids = np.zeros((n, width), np.int32)
  full_counts = np.zeros(n, np.int32)
  group_ends = np.zeros((n, num_groups), np.int32)
  for i, (r, g) in enumerate(zip(rows_ids, rows_group)):
    order = np.lexsort((r, g))
    r = r[order]
    full_counts[i] = int(np.sum(g == 0))
    group_ends[i] = np.cumsum(np.bincount(g, minlength=num_groups + 1))[1:]
    ids[i, : len(r)] = r
    if len(r):
      ids[i, len(r):] = r[-1]
  return ids, counts, full_counts, group_ends


def from_classes_rows(q_rows: list[tuple[np.ndarray, np.ndarray]], num_kv_blocks: int,
                      block_q: int, block_kv: int, pad_pow2: bool = True,
                      partial_groups: tuple = (None,)) -> BlockMap:
  """Build a BlockMap from, per Q block, (visited kv ids, their classes).

  Classes are FULL / PARTIAL, or with several `partial_groups`, group numbers: 0 for full and
  g >= 1 for a block of partial group g (`partial_groups[g - 1]` lists the dims to test).
  """
  if partial_groups == (None,):
    q_rows = [(ids, np.where(cls == FULL, 0, 1).astype(np.int8)) for ids, cls in q_rows]
  groups = len(partial_groups)
  kv_ids, kv_counts, kv_full, kv_ends = _pack_rows(
      [r[0] for r in q_rows], [r[1] for r in q_rows], groups, pad_pow2)
  # Transpose.
  all_q = np.concatenate([np.full(len(r[0]), i, np.int32) for i, r in enumerate(q_rows)] or [np.zeros(0, np.int32)])
  all_kv = np.concatenate([r[0] for r in q_rows] or [np.zeros(0, np.int32)]).astype(np.int64)
  all_c = np.concatenate([r[1] for r in q_rows] or [np.zeros(0, np.int8)])
  order = np.argsort(all_kv, kind="stable")
  splits = np.searchsorted(all_kv[order], np.arange(num_kv_blocks + 1))
  t_ids = [all_q[order[splits[j]:splits[j + 1]]] for j in range(num_kv_blocks)]
  t_cls = [all_c[order[splits[j]:splits[j + 1]]] for j in range(num_kv_blocks)]
  q_ids, q_counts, q_full, q_ends = _pack_rows(t_ids, t_cls, groups, pad_pow2)
  return BlockMap(kv_ids, kv_counts, kv_full, kv_ends, q_ids, q_counts, q_full, q_ends,
                  block_q, block_kv, len(q_rows), num_kv_blocks, tuple(partial_groups))


def from_dense_classes(classes: np.ndarray, block_q: int, block_kv: int,
                       pad_pow2: bool = True) -> BlockMap:
  rows = []
  for i in range(classes.shape[0]):
    (ids,) = np.nonzero(classes[i])
    rows.append((ids.astype(np.int32), classes[i, ids].astype(np.int8)))
  return from_classes_rows(rows, classes.shape[1], block_q, block_kv, pad_pow2)


# --------------------------------------------------------------------------------------------
# Classification.


def _host_eval(mask, q_idx, kv_idx) -> np.ndarray:
  """``mask(q_idx, kv_idx)`` as a NumPy bool array, also while a jit traces the caller: jnp
  operations of a `from_function` mask (``jnp.abs``, ``jnp.where``) run eagerly here instead of
  becoming tracers."""
  try:
    return np.asarray(mask(q_idx, kv_idx)).astype(bool)
  except jax.errors.TracerArrayConversionError:
    with jax.ensure_compile_time_eval():
      return np.asarray(mask(q_idx, kv_idx)).astype(bool)


def _classify_dense(mask_fn, q_idx, q_valid, kv_idx, kv_valid, bq, bk):
  """Exact classes by element evaluation, chunked by Q block rows. Returns [nq, nk] int8."""
  nq, nk = len(q_idx) // bq, len(kv_idx) // bk
  out = np.zeros((nq, nk), np.int8)
  rows_per_chunk = max(1, (1 << 22) // max(bq * len(kv_idx), 1))
  for start in range(0, nq, rows_per_chunk):
    stop = min(nq, start + rows_per_chunk)
    qi = q_idx[start * bq: stop * bq]
    qv = q_valid[start * bq: stop * bq]
    # A function mask may ignore one index (broadcast shape): not an in-place &=.
    m = _host_eval(mask_fn, qi[:, None], kv_idx[None, :])
    m = m & qv[:, None] & kv_valid[None, :]
    m = m.reshape(stop - start, bq, nk, bk)
    anyv = m.any(axis=(1, 3))
    # Full: every valid query row sees every key (all keys must be real).
    qv_b = qv.reshape(stop - start, bq)
    rows_ok = (m | ~qv_b[:, :, None, None]).all(axis=(1, 3))
    kv_all_valid = kv_valid.reshape(nk, bk).all(axis=1)
    full = rows_ok & kv_all_valid[None, :] & qv_b.any(axis=1)[:, None]
    out[start:stop] = np.where(full, FULL, np.where(anyv, PARTIAL, EMPTY))
  return out


def _block_stats(x: np.ndarray, valid: np.ndarray, block: int, fill_min, fill_max):
  xv_min = np.where(valid[None], x, fill_min).reshape(x.shape[0], -1, block)
  xv_max = np.where(valid[None], x, fill_max).reshape(x.shape[0], -1, block)
  return xv_min.min(-1), xv_max.max(-1)


def _classify_interval_1d(lo, hi, c, q_valid, kv_valid, bq, bk):
  """Interval mask on sequence layouts: per-row candidate band + exact refinement.

  Returns a list of (kv ids, classes) per Q block. Work and memory are O(visited blocks)
  when the key coordinates are monotone (every 1-D mask here), else O(nq * nk) booleans.
  """
  nd = lo.shape[0]
  nq, nk = lo.shape[1] // bq, c.shape[1] // bk
  if not kv_valid.any():  # e.g. a context-parallel halo past the start of the sequence
    return [(np.zeros(0, np.int32), np.zeros(0, np.int8)) for _ in range(nq)]
  big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
  lo64, hi64, c64 = lo.astype(np.int64), hi.astype(np.int64), c.astype(np.int64)
  lo_min, lo_max = _block_stats(lo64, q_valid, bq, big, small)
  hi_min, hi_max = _block_stats(hi64, q_valid, bq, big, small)
  c_min, c_max = _block_stats(c64, kv_valid, bk, big, small)
  kv_all_valid = kv_valid.reshape(nk, bk).all(axis=1)
  q_any = q_valid.reshape(nq, bq).any(axis=1)

  monotone = all(np.all(np.diff(c64[d][kv_valid]) >= 0) for d in range(nd))
  if monotone:
    # Candidate KV block range per Q block, intersected over mask dims.
    lo_blk = np.zeros(nq, np.int64)
    hi_blk = np.full(nq, nk - 1, np.int64)
    valid_c = [c64[d][kv_valid] for d in range(nd)]
    valid_pos = np.nonzero(kv_valid)[0]
    for d in range(nd):
      first = np.searchsorted(valid_c[d], lo_min[d], side="left")
      last = np.searchsorted(valid_c[d], hi_max[d], side="right") - 1
      ok = (first <= last) & (first < len(valid_pos))
      first_tok = valid_pos[np.minimum(first, len(valid_pos) - 1)]
      last_tok = valid_pos[np.clip(last, 0, len(valid_pos) - 1)]
      lo_blk = np.where(ok, np.maximum(lo_blk, first_tok // bk), nk)
      hi_blk = np.where(ok, np.minimum(hi_blk, last_tok // bk), -1)
    width = int(max(np.max(hi_blk - lo_blk + 1), 0)) if nq else 0
    cand = lo_blk[:, None] + np.arange(width)[None, :]
    in_band = cand <= hi_blk[:, None]
    cand = np.where(in_band, cand, 0)
  else:
    cand = np.broadcast_to(np.arange(nk)[None, :], (nq, nk))
    in_band = np.ones((nq, nk), bool)
  in_band &= q_any[:, None]

  nonempty = in_band.copy()
  full = in_band & kv_all_valid[cand]
  for d in range(nd):
    cmin, cmax = c_min[d][cand], c_max[d][cand]
    nonempty &= (lo_min[d][:, None] <= cmax) & (cmin <= hi_max[d][:, None])
    full &= (lo_max[d][:, None] <= cmin) & (cmax <= hi_min[d][:, None])
  partial = nonempty & ~full

  # Exact refinement of partial candidates (bounds over-approximate with several dims).
  qi_list, kj_list = np.nonzero(partial)
  if len(qi_list) * bq * bk <= _REFINE_BUDGET and len(qi_list):
    chunk = max(1, (1 << 24) // (bq * bk))
    for s in range(0, len(qi_list), chunk):
      qi, kj = qi_list[s:s + chunk], kj_list[s:s + chunk]
      kb = cand[qi, kj]
      q_tok = qi[:, None] * bq + np.arange(bq)[None, :]
      k_tok = kb[:, None] * bk + np.arange(bk)[None, :]
      m = np.ones((len(qi), bq, bk), bool)
      for d in range(nd):
        cc = c64[d][k_tok][:, None, :]
        m &= (lo64[d][q_tok][:, :, None] <= cc) & (cc <= hi64[d][q_tok][:, :, None])
      m &= q_valid[q_tok][:, :, None] & kv_valid[k_tok][:, None, :]
      partial[qi, kj] = m.any(axis=(1, 2))
  rows = []
  for i in range(nq):
    sel = partial[i] | full[i]
    ids = cand[i][sel].astype(np.int32)
    cls = np.where(full[i][sel], FULL, PARTIAL).astype(np.int8)
    rows.append((ids, cls))
  return rows


def per_dim_classes(mask: masks_lib.Neighborhood, q_layout: TiledLayout,
                    kv_layout: TiledLayout) -> list[np.ndarray]:
  """Exact [q_tiles_d, kv_tiles_d] classes per spatial dimension (blocks are products)."""
  origin = lambda layout, dim: layout.origin[dim] if layout.origin else 0
  return [_dim_classes(mask, dim, (q_layout.spatial_shape[dim], origin(q_layout, dim)),
                       (kv_layout.spatial_shape[dim], origin(kv_layout, dim)), q_layout.dilation,
                       q_layout.tile_shape[dim], kv_layout.tile_shape[dim])
          for dim in range(q_layout.ndim)]


@functools.lru_cache(maxsize=4096)
def _dim_classes(mask, dim, q_extent, kv_extent, dilation, tile_q, tile_kv):
  """Classes along `dim` for query and key slabs ``(length, origin)`` of the mask's grid
  (the whole grid: ``(mask.spatial_shape[dim], 0)``); positions outside it are padding."""
  length = mask.spatial_shape[dim]

  def coords(extent, tile):
    shape, tiles, origin = [1] * len(dilation), [1] * len(dilation), [0] * len(dilation)
    shape[dim], tiles[dim], origin[dim] = extent[0], tile, extent[1]
    layout = TiledLayout(tuple(shape), dilation, tuple(tiles), tuple(origin))
    return layout.mask_coords(dim, length)
  xq, vq = coords(q_extent, tile_q)
  xk, vk = coords(kv_extent, tile_kv)
  args = (length, mask.kernel_size[dim], mask.stride[dim], mask.dilation[dim],
          mask.is_causal[dim])
  lo, hi = masks_lib.gna_bounds_1d(xq, *args)
  ck = masks_lib.gna_coord_1d(xk, length, mask.dilation[dim])
  return _classify_dense(lambda a, b: (lo[a] <= ck[b]) & (ck[b] <= hi[a]),
                         np.arange(len(xq)), vq, np.arange(len(xk)), vk, tile_q, tile_kv)


def _classify_tiled(mask: masks_lib.Neighborhood, q_layout: TiledLayout, kv_layout: TiledLayout):
  """Neighborhood masks on tiled layouts: exact per-dimension classes, combined by product."""
  n = q_layout.ndim
  per_dim = []  # (ids [q_tiles, m], classes [q_tiles, m]) with -1 padding
  for cls in per_dim_classes(mask, q_layout, kv_layout):
    m = max(int((cls > 0).sum(axis=1).max()), 1)
    ids = np.full((cls.shape[0], m), -1, np.int64)
    cl = np.zeros((cls.shape[0], m), np.int8)
    for a in range(cls.shape[0]):
      (nz,) = np.nonzero(cls[a])
      ids[a, : len(nz)] = nz
      cl[a, : len(nz)] = cls[a, nz]
    per_dim.append((ids, cl))
  # Every Q block = a tuple of per-dim tile coordinates (row-major over the tile grid).
  kv_grid = kv_layout.tile_grid
  q_coords = np.stack(np.unravel_index(np.arange(q_layout.num_blocks), q_layout.tile_grid), axis=1)
  ids = np.zeros((q_layout.num_blocks, 1), np.int64)
  pattern = np.zeros((q_layout.num_blocks, 1), np.int8)  # bit d: partial along dim d
  valid = np.ones((q_layout.num_blocks, 1), bool)
  for dim in range(n):
    d_ids, d_cls = per_dim[dim]
    row_ids, row_cls = d_ids[q_coords[:, dim]], d_cls[q_coords[:, dim]]
    ids = (ids[:, :, None] * kv_grid[dim] + np.maximum(row_ids, 0)[:, None, :]).reshape(len(ids), -1)
    bit = ((row_cls == PARTIAL).astype(np.int8) << dim)[:, None, :]
    pattern = (pattern[:, :, None] | bit).reshape(len(ids), -1)
    valid = (valid[:, :, None] & (row_cls > EMPTY)[:, None, :]).reshape(len(ids), -1)
  # Group number = the pattern (0: full; g: partial exactly along the dims of bitmask g).
  return [(ids[i][valid[i]].astype(np.int32), pattern[i][valid[i]]) for i in range(len(ids))]


def pattern_groups(ndim: int) -> tuple:
  """partial_groups for tiled neighborhoods: group g tests the dims in bitmask g."""
  return tuple(tuple(d for d in range(ndim) if g >> d & 1) for g in range(1, 1 << ndim))


@functools.lru_cache(maxsize=256)
def build(mask: masks_lib.Mask, q_layout, kv_layout, pad_pow2: bool = True) -> BlockMap:
  """The block map of `mask` for the given Q and KV layouts (block sizes come from them)."""
  bq, bk = q_layout.block, kv_layout.block
  if (isinstance(mask, masks_lib.Neighborhood) and isinstance(q_layout, TiledLayout)
      and isinstance(kv_layout, TiledLayout)):
    rows = _classify_tiled(mask, q_layout, kv_layout)
    return from_classes_rows(rows, kv_layout.num_blocks, bq, bk, pad_pow2,
                             pattern_groups(q_layout.ndim))
  q_idx, q_valid = q_layout.token_index()
  kv_idx, kv_valid = kv_layout.token_index()
  if mask.is_interval:
    lo, hi, c = masks_lib.per_token_intervals(mask, q_idx, kv_idx, q_valid, kv_valid)
    rows = _classify_interval_1d(lo, hi, c, q_valid, kv_valid, bq, bk)
    return from_classes_rows(rows, kv_layout.num_blocks, bq, bk, pad_pow2)
  classes = _composed_classes(mask, q_layout, kv_layout, q_idx, q_valid, kv_idx, kv_valid)
  classes = _refine_partial(mask, classes, q_idx, q_valid, kv_idx, kv_valid, bq, bk)
  return from_dense_classes(classes, bq, bk, pad_pow2)


def _composed_classes(mask, q_layout, kv_layout, q_idx, q_valid, kv_idx, kv_valid):
  """[nq, nk] classes: interval parts analytically, `&`/`|` by composition, the rest by
  element evaluation. Composition is conservative (a `|` of two partial blocks may be full,
  an `&` of two partial blocks may be empty); `_refine_partial` makes it exact."""
  bq, bk = q_layout.block, kv_layout.block
  nq, nk = len(q_idx) // bq, len(kv_idx) // bk
  if mask.is_interval:
    lo, hi, c = masks_lib.per_token_intervals(mask, q_idx, kv_idx, q_valid, kv_valid)
    out = np.zeros((nq, nk), np.int8)
    for i, (ids, cls) in enumerate(_classify_interval_1d(lo, hi, c, q_valid, kv_valid, bq, bk)):
      out[i, ids] = cls
    return out
  if isinstance(mask, (masks_lib.And, masks_lib.Or)):
    a = _composed_classes(mask.a, q_layout, kv_layout, q_idx, q_valid, kv_idx, kv_valid)
    b = _composed_classes(mask.b, q_layout, kv_layout, q_idx, q_valid, kv_idx, kv_valid)
    if isinstance(mask, masks_lib.And):
      return np.where((a == FULL) & (b == FULL), FULL,
                      np.where((a == EMPTY) | (b == EMPTY), EMPTY, PARTIAL)).astype(np.int8)
    return np.where((a == FULL) | (b == FULL), FULL, np.maximum(a, b)).astype(np.int8)
  pairs = len(q_idx) * len(kv_idx)
  if pairs > (1 << 34):
    raise ValueError(
        f"mask {type(mask).__name__} has no analytic block map and {pairs} token pairs are too "
        "many to evaluate; express it with interval masks (causal, sliding_window, "
        "block_local, neighborhood, sink and their '&' / '|')")
  return _classify_dense(mask, q_idx, q_valid, kv_idx, kv_valid, bq, bk)


def _refine_partial(mask, classes, q_idx, q_valid, kv_idx, kv_valid, bq, bk):
  """Exact classes for the PARTIAL blocks (element evaluation, chunked), within a budget."""
  qi_list, kj_list = np.nonzero(classes == PARTIAL)
  if not len(qi_list) or len(qi_list) * bq * bk > _REFINE_BUDGET:
    return classes
  classes = classes.copy()
  chunk = max(1, (1 << 22) // (bq * bk))
  kv_all_valid = kv_valid.reshape(-1, bk).all(axis=1)
  for s in range(0, len(qi_list), chunk):
    qi, kj = qi_list[s:s + chunk], kj_list[s:s + chunk]
    q_tok = qi[:, None] * bq + np.arange(bq)[None, :]
    k_tok = kj[:, None] * bk + np.arange(bk)[None, :]
    m = _host_eval(mask, q_idx[q_tok][:, :, None], kv_idx[k_tok][:, None, :])
    qv, kvv = q_valid[q_tok][:, :, None], kv_valid[k_tok][:, None, :]
    m = m & qv & kvv
    full = (m | ~qv).all(axis=(1, 2)) & kv_all_valid[kj]
    classes[qi, kj] = np.where(full, FULL, np.where(m.any(axis=(1, 2)), PARTIAL, EMPTY))
  return classes


def for_sequences(mask: masks_lib.Mask, seq_q: int, seq_kv: int, block_q: int,
                  block_kv: int) -> BlockMap:
  return build(mask, SequenceLayout(seq_q, block_q), SequenceLayout(seq_kv, block_kv))


# --------------------------------------------------------------------------------------------
# Runtime maps (content-routed attention): built on device, inside jit.


def _packed_rows(cls, num_cols: int):
  """Per row of `cls` [..., rows, cols] (EMPTY / PARTIAL / FULL), the visited columns, full
  first then partial, each ascending: (ids [..., rows, cols] with the tail repeating the last
  visited id, counts, full counts)."""
  import jax.numpy as jnp
  col = jnp.arange(num_cols, dtype=jnp.int32)
  key = jnp.where(cls == FULL, col, jnp.where(cls == PARTIAL, num_cols + col, 2 * num_cols))
  key = jnp.sort(key, axis=-1)
  counts = jnp.sum(cls != EMPTY, axis=-1).astype(jnp.int32)
  full = jnp.sum(cls == FULL, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(key, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  key = jnp.where(key < 2 * num_cols, key, last)
  return jnp.where(key < 2 * num_cols, key % num_cols, 0).astype(jnp.int32), counts, full


def _check_segments(q_seg, kv_seg, static: BlockMap):
  """q_seg [batch, seq_q] and kv_seg [batch, seq_kv] integer ids that fit the static map's
  blocks; else a ValueError naming the argument and the rule."""
  import jax.numpy as jnp
  out = []
  for name, seg, blocks, block in (("q_seg", q_seg, static.num_q_blocks, static.block_q),
                                   ("kv_seg", kv_seg, static.num_kv_blocks, static.block_kv)):
    seg = jnp.asarray(seg)
    if seg.ndim != 2 or not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer [batch, seq] array, got {seg.dtype} "
                       f"{seg.shape}")
    if not 0 < seg.shape[1] <= blocks * block:
      raise ValueError(f"{name} has {seg.shape[1]} positions; the map's {blocks} blocks of "
                       f"{block} hold 1 to {blocks * block}")
    out.append(seg)
  if out[0].shape[0] != out[1].shape[0]:
    raise ValueError(f"q_seg and kv_seg must have the same batch, got {out[0].shape[0]} and "
                     f"{out[1].shape[0]}")
  return out


def segment_classes(q_seg, kv_seg, static: BlockMap):
  """[batch, 1, num_q_blocks, num_kv_blocks] int8 classes of (the static map) AND (segment
  ids equal), inside `jax.jit`, from each block's smallest and largest id: a pair of blocks
  whose id ranges do not meet has no equal pair (EMPTY); one id on both sides keeps the
  static class (FULL stays full); else at most PARTIAL. q_seg [batch, seq_q], kv_seg
  [batch, seq_kv], blocks of the static map's sizes (the last block's padding repeats its
  last id, so it changes no range). Exact at block level for packed documents (ids
  ascending); a conservative superset for ids in any order."""
  import jax.numpy as jnp
  q_seg, kv_seg = _check_segments(q_seg, kv_seg, static)

  def ranges(seg, block, n):
    seg = jnp.asarray(seg, jnp.int32)
    seg = jnp.pad(seg, [(0, 0), (0, n * block - seg.shape[1])], mode="edge")
    seg = seg.reshape(seg.shape[0], n, block)
    return seg.min(axis=-1), seg.max(axis=-1)

  q_lo, q_hi = ranges(q_seg, static.block_q, static.num_q_blocks)
  k_lo, k_hi = ranges(kv_seg, static.block_kv, static.num_kv_blocks)
  meet = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
  one = ((q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :]
         & (q_lo[:, :, None] == k_lo[:, None, :]))
  classes = jnp.asarray(static.dense_classes())[None]  # host-side once per static map
  cls = jnp.where(meet, jnp.where(one, classes, jnp.minimum(classes, PARTIAL)), EMPTY)
  return cls[:, None].astype(jnp.int8)


def _runtime_map(cls, static: BlockMap, kv_width: int, segments_full: bool) -> BlockMap:
  """The runtime map of classes [batch, heads, nq, nk]: kv rows `kv_width` wide, q rows
  (the transpose, for dK/dV) as wide as the static map's."""
  import jax.numpy as jnp
  nq, nk = static.num_q_blocks, static.num_kv_blocks
  kv_ids, kv_counts, kv_full = _packed_rows(cls, nk)
  q_ids, q_counts, q_full = _packed_rows(jnp.swapaxes(cls, 2, 3), nq)
  q_width = max(1, min(nq, static.max_q))
  return BlockMap(kv_ids[..., :kv_width], kv_counts, kv_full, kv_counts[..., None],
                  q_ids[..., :q_width], q_counts, q_full, q_counts[..., None], static.block_q,
                  static.block_kv, nq, nk, segments_full=segments_full)


def _check_runtime_static(static: BlockMap):
  if static.partial_groups != (None,):
    raise ValueError("runtime block maps take 1-D (sequence) plans: one partial group")


def from_segments(q_seg, kv_seg, static: BlockMap) -> BlockMap:
  """The runtime block map of packed documents, inside `jax.jit`: the static mask's map
  without the block pairs whose segment ids never match, and with FULL only where both
  blocks hold one and the same id (`segment_classes`); kernels then test segment ids on
  partial blocks only (``segments_full``). Fields [batch, 1, rows, ...]: every head shares
  its batch element's rows (`BlockMap.shares_heads`), as wide as the static map's."""
  _check_runtime_static(static)
  cls = segment_classes(q_seg, kv_seg, static)
  return _runtime_map(cls, static, max(1, static.max_kv), True)


def from_selection(selection, static: BlockMap, segments=None) -> BlockMap:
  """The runtime block map of a content-routed selection, inside `jax.jit`.

  selection: int [batch, heads, num_q_blocks, k]: the KV block ids each Q block of each head
  visits (-1 or out of range: none; repeats are dropped). The result visits the selected
  blocks that the static mask's map (`static`, same block sizes) visits, with its
  full/partial classes: attention is restricted to (static mask) AND (selected blocks).
  Fields are [batch, heads, rows, ...] (`BlockMap.is_runtime`); kv rows are k wide (no row
  visits more), q rows (the transpose, for dK/dV) as wide as the static map's. One partial
  group. `segments`: (q_seg, kv_seg) to drop the blocks whose segment ids never match as well
  (`segment_classes`; full blocks then need no segment test).
  """
  import jax.numpy as jnp
  _check_runtime_static(static)
  nq, nk = static.num_q_blocks, static.num_kv_blocks
  classes = (jnp.asarray(static.dense_classes())[None, None] if segments is None
             else segment_classes(*segments, static))
  b, h, rows, k = selection.shape
  if rows != nq:
    raise ValueError(f"selection must have num_q_blocks = {nq} rows, got shape "
                     f"{selection.shape}")
  ids = selection.astype(jnp.int32)
  ok = (ids >= 0) & (ids < nk)
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, :, None, None]
  qi = jnp.arange(nq)[None, None, :, None]
  chosen = jnp.zeros((b, h, nq, nk), jnp.bool_).at[bi, hi, qi, jnp.where(ok, ids, nk)].set(
      True, mode="drop")
  cls = jnp.where(chosen, classes, EMPTY).astype(jnp.int8)
  return _runtime_map(cls, static, k, segments is not None)
