"""Mask inputs of the Hopper forward built on the host: the MMA-bias tables of partial
neighborhood blocks (`_mma_inputs`), window-anchored KV boxes (`_window_inputs`) and
per-warpgroup KV lists (`_split_inputs`)."""
from __future__ import annotations

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np

from jax_sparse_attn import masks
from jax_sparse_attn.layout import TiledLayout
from jax_sparse_attn.plan import AttentionPlan, gathered, make_plan

from .. import mma_masks, triton_attention
from .config import _COMPUTE_WGS, _ROWS
from .boxes import _half_tile


def _onehot(spec: mma_masks.MaskSpec, rows: int) -> np.ndarray:
  """The MMA bias's A operand [rows, W]: each row's coordinate columns."""
  r, u = np.arange(rows)[:, None], np.arange(spec.mma_width)[None, :]
  hit = np.zeros((rows, spec.mma_width), bool)
  for offset, extent, stride in spec.mma_cols:
    if offset >= 0:
      hit |= (u - offset) == (r // stride) % extent
  return hit


def _mma_spec(plan: AttentionPlan, rows: int, scale: float):
  """The MMA-bias spec with host tables for `rows`-row query tiles, or None."""
  cfg = triton_attention.TritonConfig(mma_onehot="rows", single_loop=False)
  spec = mma_masks.mask_spec(plan, False, cfg, rows, plan.block_kv, scale, forward=True)
  return spec if spec.mma_cols is not None and spec.mma_tables else None


def _mma_inputs(plan: AttentionPlan, scale: float):
  """MMA-bias masks for neighborhood plans (`triton_attention._MMABias`, one-hot on the
  query side): (onehot [128, W] bf16, tables [n, W, block_kv] bf16 of 0 / the masked value,
  table_ids [q blocks, steps] int32), or None where they do not apply (1-D sequences,
  W > 32, tables over budget). Both compute warpgroups share a step's table: its columns
  are the coordinates of the whole 128-row tile."""
  rows = 2 * _ROWS
  spec = _mma_spec(plan, rows, scale)
  built = None if spec is None else mma_masks.tables(plan, spec, rows, plan.block_kv, True)
  if built is None:
    return None
  tables, table_ids = built
  tables = np.where(tables, 0.0, spec.mma_value)
  return (_onehot(spec, rows).astype(jnp.bfloat16), tables.astype(jnp.bfloat16),
          table_ids.astype(np.int32))


@functools.lru_cache(maxsize=64)
def _window_inputs(plan: AttentionPlan, scale: float):
  """Window-anchored KV boxes (`MosaicGPUConfig.kv_windows`) for a gathered neighborhood
  plan: each query tile visits boxes of the KV tile's shape placed on its own union window
  (`simulate.window_segments`, per dim; a box is the product of one segment per dim), full
  boxes first. Masks are the MMA bias of `_mma_inputs`, its tables built here from spatial
  coordinates: a key passes a column's dim where it is inside that query coordinate's
  interval and owned by the box (a box moved back from the array's edge masks the keys of
  the box before it).

  Returns (origins [q blocks, steps, dims] int32: each step's box origin; counts [q blocks,
  2] (full, all); onehot [128, W]; tables [n, W, block_kv]; table_ids [q blocks, steps]), or
  None where this does not apply (no neighborhood, dilation, 1-D, block maps known only at
  run time, one-hot wider than 32 columns, a box larger than the array)."""
  from jax_sparse_attn.simulate import window_segments
  mask = plan.mask
  if (not isinstance(mask, masks.Neighborhood) or not isinstance(plan.q_layout, TiledLayout)
      or not isinstance(plan.kv_layout, TiledLayout)
      or not isinstance(plan.block_map.kv_ids, np.ndarray)):
    return None
  spec = _mma_spec(plan, 2 * _ROWS, scale)
  if spec is None:
    return None
  qt, kt = plan.q_layout.tile_shape, plan.kv_layout.tile_shape
  if math.prod(qt) != 2 * _ROWS:
    return None
  per_dim = [window_segments(mask, d, q, k) for d, (q, k) in enumerate(zip(qt, kt))]
  if any(p is None for p in per_dim):
    return None
  nd = len(qt)

  # Per dim and (query tile, segment): the pass matrix [q coordinates of the tile, keys of
  # the box] (query coordinates past the array see nothing), deduplicated into patterns.
  patterns, pattern_ids = [], []
  for d in range(nd):
    size = mask.spatial_shape[d]
    x = np.arange(qt[d])
    uniq, ids = {}, []
    for g, segs in enumerate(per_dim[d]):
      xq = g * qt[d] + x
      lo, hi = masks.gna_bounds_1d(np.minimum(xq, size - 1), size, mask.kernel_size[d],
                                   mask.stride[d], 1, mask.is_causal[d])
      row = []
      for origin, first, last, _ in segs:
        kc = origin + np.arange(kt[d])
        ok = ((lo[:, None] <= kc) & (kc <= hi[:, None]) & (xq[:, None] < size)
              & (first <= kc) & (kc <= last))
        row.append(uniq.setdefault(ok.tobytes(), (len(uniq), ok))[0])
      ids.append(row)
    patterns.append([ok for _, ok in uniq.values()])  # in id order (insertion order)
    pattern_ids.append(ids)

  cols = spec.mma_cols
  col_dims = [d for d in range(nd) if cols[d][0] >= 0]
  folded = [d for d in range(nd) if cols[d][0] < 0]
  width = spec.mma_width

  def table(key):  # the test matrix [W, block_kv] of per-dim patterns `key`
    ok = np.ones((width, *kt), bool)
    shape = lambda d: tuple(kt[e] if e == d else 1 for e in range(nd))
    for d in col_dims:
      offset, extent, _ = cols[d]
      ok[offset:offset + extent] = patterns[d][key[d]][:extent].reshape((extent, *shape(d)))
    if folded:
      fold = np.ones(kt, bool)
      for d in folded:
        fold = fold & patterns[d][key[d]][0].reshape(shape(d))
      offset, extent, _ = cols[col_dims[0]]
      ok[offset:offset + extent] &= fold
    return ok.reshape(width, -1)

  grid = plan.q_layout.tile_grid
  n_q = math.prod(grid)
  steps = math.prod(max(len(s) for s in per_dim[d]) for d in range(nd))
  origins = np.zeros((n_q, steps, nd), np.int32)
  counts = np.zeros((n_q, 2), np.int32)
  table_ids = np.zeros((n_q, steps), np.int32)
  tables, keys = [], {}
  for qi in range(n_q):
    g = np.unravel_index(qi, grid)
    segs = [per_dim[d][g[d]] for d in range(nd)]
    boxes = list(itertools.product(*(range(len(s)) for s in segs)))
    full = [all(segs[d][i[d]][3] for d in range(nd)) for i in boxes]
    boxes = [b for b, f in zip(boxes, full) if f] + [b for b, f in zip(boxes, full) if not f]
    counts[qi] = (sum(full), len(boxes))
    for t, b in enumerate(boxes):
      origins[qi, t] = [segs[d][b[d]][0] for d in range(nd)]
      if t >= counts[qi, 0]:
        key = tuple(pattern_ids[d][g[d]][b[d]] for d in range(nd))
        if key not in keys:
          keys[key] = len(tables)
          tables.append(table(key))
        table_ids[qi, t] = keys[key]
  if not tables:
    tables.append(np.ones((width, math.prod(kt)), bool))
  tables = np.where(np.stack(tables), 0.0, spec.mma_value).astype(jnp.bfloat16)
  return (origins, counts, _onehot(spec, 2 * _ROWS).astype(jnp.bfloat16), tables, table_ids)


@functools.lru_cache(maxsize=16)
def window_dq_inputs(plan: AttentionPlan, kv_tile: tuple[int, ...], scale: float):
  """Window-anchored KV boxes of `kv_tile` for the backward's dQ kernel (`attention_bwd_dq`,
  ``window``) on a gathered neighborhood plan: the forward's `_window_inputs` for the plan's
  query tiles, with each step's test matrix cut into the kernel's two 64-key halves.

  Returns (origins [q blocks, steps, dims] int32 in the plan's key grid: shifted by its lead
  where that grid starts before the array (`ops._backward_plan`); counts [q blocks, 2] (full,
  all); onehot [128, W]; tables [2n, W, 64]; table_ids [q blocks, 2 * steps]: step t's halves
  at 2t, 2t + 1), or None where window boxes do not apply."""
  mask = plan.mask
  kl = plan.kv_layout
  if not (isinstance(mask, masks.Neighborhood) and isinstance(kl, TiledLayout)
          and isinstance(plan.q_layout, TiledLayout) and not plan.q_layout.is_shard):
    return None
  nd = len(mask.spatial_shape)
  lead = np.asarray([-o for o in kl.origin] if kl.origin else [0] * nd, np.int32)
  # the key grid holds the whole array (a shifted grid), not a slab of it
  if np.any(lead < 0) or any(a + n > p for a, n, p in zip(lead, mask.spatial_shape,
                                                          kl.spatial_shape)):
    return None
  wplan = make_plan(mask, plan.q_layout,
                    TiledLayout(tuple(mask.spatial_shape), tuple(mask.dilation), tuple(kv_tile)))
  built = _window_inputs(wplan, scale)
  if built is None:
    return None
  origins, counts, onehot, tables, table_ids = built
  n, width, keys = tables.shape
  halves = tables.reshape(n, width, 2, keys // 2).transpose(0, 2, 1, 3)
  ids = np.stack([2 * table_ids, 2 * table_ids + 1], axis=-1).reshape(len(table_ids), -1)
  return (origins + lead, counts, onehot, halves.reshape(2 * n, width, keys // 2),
          ids.astype(np.int32))


_SPLIT_MAX_WIDTH = 16  # one-hot columns of a 64-row half tile (two tables per K/V slot)


@functools.lru_cache(maxsize=64)
def _split_inputs(plan: AttentionPlan, scale: float):
  """Per-warpgroup KV lists for a gathered neighborhood plan of box tiles: each compute
  warpgroup's 64 query rows (the half tile, `_half_tile`) get their own block map, whose
  visited blocks are a subset of the whole tile's, so a warpgroup skips the KV blocks only
  the other half needs. The bound is then that of 64-row query tiles (2-D 128x128 k=33:
  10.2x with 8x8 KV tiles, vs 8.9x for 128-row tiles), while K and V are loaded once per
  128-row tile.

  Step t of a q block pairs the warpgroups: blocks both halves visit are one load shared by
  both; blocks one half visits are paired with the other half's, two loads in one step;
  the longer list's leftovers run alone. Returns (onehot [128, W], tables [n, W, block_kv]
  with table 0 all zeros, loads [q blocks, L, 3], counts [q blocks, 6]) as `_kernel`
  documents, or None where this does not apply (no mask, 1-D, block maps known only at run
  time, half-tile one-hot wider than `_SPLIT_MAX_WIDTH`, tables over budget)."""
  mask = plan.mask
  if (not isinstance(mask, masks.Neighborhood) or not isinstance(plan.q_layout, TiledLayout)
      or not isinstance(plan.kv_layout, TiledLayout)
      or not isinstance(plan.block_map.kv_ids, np.ndarray)):
    return None
  tile = plan.q_layout.tile_shape
  if math.prod(tile) != 2 * _ROWS:
    return None
  half, hd = _half_tile(tile)
  hplan = make_plan(mask, TiledLayout(mask.spatial_shape, mask.dilation, half), plan.kv_layout)
  spec = _mma_spec(hplan, _ROWS, scale)
  if spec is None or spec.mma_width > _SPLIT_MAX_WIDTH:
    return None
  built = mma_masks.tables(hplan, spec, _ROWS, plan.block_kv, True)
  if built is None:
    return None
  tables, table_ids = built
  hmap = hplan.block_map
  ids, counts, full = (np.asarray(x) for x in (hmap.kv_ids, hmap.kv_counts, hmap.kv_full_counts))
  grid, hgrid = plan.q_layout.tile_grid, hplan.q_layout.tile_grid

  def visits(g, w):
    """{kv block: its table (0 if full)} of half w of the q tile at grid position g."""
    hc = list(g)
    hc[hd] = 2 * hc[hd] + w
    if hc[hd] >= hgrid[hd]:  # only padding rows: nothing to visit
      return {}
    h = int(np.ravel_multi_index(hc, hgrid))
    # Table 0 passes everything (prepended below): full blocks and idle warpgroups.
    return {int(ids[h, t]): int(t >= full[h]) * (1 + int(table_ids[h, t]))
            for t in range(counts[h])}

  n_q = plan.block_map.num_q_blocks
  per_block = []
  for qi in range(n_q):
    g = np.unravel_index(qi, grid)
    v0, v1 = visits(g, 0), visits(g, 1)
    shared = [j for j in v0 if j in v1]
    only = [[j for j in v if j not in other] for v, other in ((v0, v1), (v1, v0))]
    loads = []  # (kv block, each warpgroup's table)
    for j in shared:
      loads.append((j, v0[j], v1[j]))
    for a, b in zip(*only):
      loads += [(a, v0[a], 0), (b, 0, v1[b])]
    n_pairs = min(len(o) for o in only)
    for j in only[0][n_pairs:]:
      loads.append((j, v0[j], 0))
    for j in only[1][n_pairs:]:
      loads.append((j, 0, v1[j]))
    active = [len(shared) + len(o) for o in only]
    per_block.append((loads, (max(active), len(loads), *active, len(shared), n_pairs)))
  max_loads = max(1, max(len(l) for l, _ in per_block))
  loads = np.zeros((n_q, max_loads, 3), np.int32)
  counts = np.zeros((n_q, 6), np.int32)
  for qi, (l, c) in enumerate(per_block):
    loads[qi, :len(l)] = np.asarray(l, np.int32).reshape(-1, 3)
    counts[qi] = c
  onehot = np.tile(_onehot(spec, _ROWS), (_COMPUTE_WGS, 1))
  tables = np.where(np.concatenate([np.ones_like(tables[:1]), tables]), 0.0, spec.mma_value)
  return onehot.astype(jnp.bfloat16), tables.astype(jnp.bfloat16), loads, counts


@functools.lru_cache(maxsize=64)
def backward_mma_inputs(plan: AttentionPlan, scale: float):
  """MMA-bias masks of the two backward kernels for a neighborhood plan in kernel order with
  128-row Q and KV blocks: the forward's bias with the loop side cut into the kernels' 64-row
  steps. Per kernel (dQ first, then dK/dV) (onehot [128, W] bf16 over the CTA's own tile: query
  coordinates for dQ, key coordinates for dK/dV; tables [n, W, 64] bf16 of 0 / the masked value
  over the step's 64 keys (dQ) or queries (dK/dV); table_ids [blocks, 2 * entries] int32: step
  2e + s is half s of the block's e-th map entry (0 for full entries)), or None where the
  bias does not apply (1-D masks, mask functions, runtime maps, one-hot wider than 32
  columns, tables over budget)."""
  if (plan.block_q != 2 * _ROWS or plan.block_kv != 2 * _ROWS
      or not isinstance(plan.block_map.kv_ids, np.ndarray)):
    return None
  cfg = triton_attention.TritonConfig(mma_onehot="rows", single_loop=False)
  out = []
  for loop_is_kv in (True, False):
    spec = mma_masks.mask_spec(plan, False, cfg, 2 * _ROWS, _ROWS, scale, loop_is_kv=loop_is_kv)
    if spec.mma_cols is None or not spec.mma_tables:
      return None
    built = mma_masks.tables(plan, spec, 2 * _ROWS, _ROWS, loop_is_kv)
    if built is None:
      return None
    tables, table_ids = built
    out.append((_onehot(spec, 2 * _ROWS).astype(jnp.bfloat16),
                np.where(tables, 0.0, spec.mma_value).astype(jnp.bfloat16),
                table_ids.astype(np.int32)))
  return tuple(out)


_ENTRY_CHUNK = 2048  # `live_quarters`' partial entries per step
SEPARABLE_QUARTERS = True  # False: every neighborhood row tested (the general form)


def _part_ranges(lo: np.ndarray, hi: np.ndarray, blocks: np.ndarray, block: int):
  """Per Q block of `blocks` and 64-row part: each dim's smallest ``lo`` and largest ``hi``
  over the part's rows that may see a key (rows empty in some dim, padding, left out; a part
  with none gets an empty range): ([B, parts, dims], [B, parts, dims])."""
  idx = blocks[:, None] * block + np.arange(block)  # [B, rows]
  ql, qh = lo[:, idx], hi[:, idx]  # [dims, B, rows]
  valid = (ql <= qh).all(0)  # [B, rows]
  big = np.iinfo(np.int32).max
  shape = (lo.shape[0], len(blocks), block // _ROWS, _ROWS)
  part_lo = np.where(valid, ql, big).reshape(shape).min(-1).transpose(1, 2, 0)
  part_hi = np.where(valid, qh, -1).reshape(shape).max(-1).transpose(1, 2, 0)
  return part_lo, part_hi


def _half_ranges(c: np.ndarray, blocks: np.ndarray, block: int) -> tuple[np.ndarray, ...]:
  """Per block of `blocks` and 64-row part of it: the smallest and largest valid coordinate
  per mask row of ``c`` [rows, n] (padding, coordinate -1, left out; a part with none gets
  an empty range): ([P, parts, rows], [P, parts, rows])."""
  idx = blocks[:, None] * block + np.arange(block)
  x = c[:, idx].transpose(1, 0, 2).reshape(len(blocks), c.shape[0], block // _ROWS, _ROWS)
  valid = x >= 0
  big = np.iinfo(np.int32).max
  lo = np.where(valid, x, big).min(-1).transpose(0, 2, 1)
  hi = np.where(valid, x, -1).max(-1).transpose(0, 2, 1)
  return lo, hi


def live_quarters(plan: AttentionPlan):
  """`_live_quarters` of the plan in kernel order: a gathered plan and its kernel-order twin
  (`plan.gathered`, which the backward's kernels take) share one computation."""
  return _live_quarters(gathered(plan, False) if plan.gathered else plan)


@functools.lru_cache(maxsize=64)
def _live_quarters(plan: AttentionPlan):
  """Which 64x64 quarters of each visited (Q block, KV block) pair of a static map may hold
  a query-key pair that the element test passes, for the backward kernels to skip the
  others (a sink's KV block seen from far queries: only its first 64 keys; the causal
  diagonal: its upper right quarter). Bit ``2 * q_part + kv_half`` of an entry (q_part: the
  64-row part of the 128-row Q block, kv_half: of the 128-key KV block); full entries have
  every bit. From the interval vectors (`element.mask_vectors`), per dim as ranges: a
  quarter is kept where, for some term, each dim's query interval meets the range of the
  quarter's key coordinates, a superset of the pairs the kernels test (mask functions and
  segment ids only remove more); for a neighborhood each dim's rows first reduce to one
  range per part (`SEPARABLE_QUARTERS`: exact, and 20x faster at 32×128² k8×16²). Returns
  (forward map bits [n_q, max_kv], transposed map bits [n_kv, max_q]) int32, or None
  (runtime maps, other block sizes)."""
  from .element import mask_vectors
  bm = plan.block_map
  if (plan.block_q != 2 * _ROWS or plan.block_kv != 2 * _ROWS
      or not isinstance(bm.kv_ids, np.ndarray)):
    return None
  lo, hi, c, terms, _ = mask_vectors(plan)
  lo, hi, c = (np.asarray(x, np.int32) for x in (lo, hi, c))
  per = lo.shape[0] // terms
  every = (1 << 4) - 1
  # A neighborhood's one term is a product of per-dim intervals, each a function of the
  # query's own coordinate in that dim, and a 64-row part of a tile is a box: a quarter is
  # live iff every dim has some row whose interval meets the half's key range, so each dim's
  # rows reduce to one range first (`SEPARABLE_QUARTERS`; exact against the dense mask).
  separable = (SEPARABLE_QUARTERS and terms == 1 and isinstance(plan.mask, masks.Neighborhood)
               and not plan.q_layout.is_shard and not plan.kv_layout.is_shard)

  def bits(ids, counts, full, rows_are_q: bool):
    ids, counts, full = np.asarray(ids), np.asarray(counts), np.asarray(full)
    e = np.arange(ids.shape[1])[None]
    out = np.where(e < counts[:, None], every, 0).astype(np.int32)
    row, ent = np.nonzero((e >= full[:, None]) & (e < counts[:, None]))
    if not len(row):
      return out
    qb, kb = (row, ids[row, ent]) if rows_are_q else (ids[row, ent], row)
    # Key ranges by half, once per KV block (entries repeat blocks many times).
    blocks, of_entry = np.unique(kb, return_inverse=True)
    half_lo, half_hi = _half_ranges(c, blocks, plan.block_kv)  # [blocks, 2, rows]
    weight = 1 << (2 * np.arange(2)[:, None] + np.arange(2))  # bit of (q part, kv half)
    if separable:  # per part, each dim's union of its rows' intervals
      q_blocks, of_q = np.unique(qb, return_inverse=True)
      part_lo, part_hi = _part_ranges(lo, hi, q_blocks, plan.block_q)  # [blocks, 2, dims]
      ql, qh = part_lo[of_q][:, :, None], part_hi[of_q][:, :, None]  # [P, part, 1, dims]
      k_lo, k_hi = half_lo[of_entry][:, None], half_hi[of_entry][:, None]  # [P, 1, half, dims]
      live = ((ql <= k_hi) & (k_lo <= qh)).all(-1)  # [P, q part, kv half]
      out[row, ent] = (live * weight).sum((1, 2))
      return out
    # The general form (unions of terms, dims on one coordinate): a part's union of its
    # rows' intervals is too coarse there, so each query row is tested; in chunks of
    # entries, so that the temporaries stay in cache.
    for s in range(0, len(qb), _ENTRY_CHUNK):
      part = slice(s, s + _ENTRY_CHUNK)
      q_idx = qb[part, None] * plan.block_q + np.arange(plan.block_q)  # [P, 128]
      k_lo, k_hi = half_lo[of_entry[part]], half_hi[of_entry[part]]  # [P, 2, rows]
      live = np.zeros((len(q_idx), plan.block_q, 2), bool)
      for t in range(terms):
        ok = np.ones_like(live)
        for d in range(t * per, (t + 1) * per):
          ql, qh = lo[d][q_idx][..., None], hi[d][q_idx][..., None]  # [P, 128, 1]
          ok &= (ql <= k_hi[:, None, :, d]) & (k_lo[:, None, :, d] <= qh)
        live |= ok
      live = live.reshape(len(q_idx), 2, _ROWS, 2).any(2)  # [P, q part, kv half]
      out[row[part], ent[part]] = (live * weight).sum((1, 2))
    return out

  return (bits(bm.kv_ids, bm.kv_counts, bm.kv_full_counts, True),
          bits(bm.q_ids, bm.q_counts, bm.q_full_counts, False))
