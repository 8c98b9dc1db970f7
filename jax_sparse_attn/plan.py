"""An attention plan: everything a backend needs that is known at trace time.

``make_plan(mask, q_layout, kv_layout)`` produces (and caches) the block map and the
per-token int32 vectors from which kernels rebuild the element mask of partial blocks:

* ``q_lo, q_hi [num_dims, padded_q]`` and ``kv_c [num_dims, padded_kv]``: the interval form
  (`masks.IntervalMask`); padding is folded in (empty interval / coordinate -1).
* ``mask_fn``: for masks with no interval form, the mask itself, evaluated in-kernel on the
  kernel positions ``q_index / kv_index`` (the caller's indices; on a context-parallel shard
  a `masks.Remapped` mask maps them to global ones). The interval vectors then only encode
  padding.
* ``union``: for 1-D masks that are unions of interval masks (``causal & (window | sink)``:
  `masks.interval_terms`), ``(terms, lo, hi, c)``: the terms' interval vectors
  (`masks.union_intervals`, T * D rows; dims on one coordinate merged), which the Hopper
  kernels test instead of running ``mask_fn``; also for interval masks whose dims merge. Other
  backends run ``mask_fn`` (or the interval vectors above).
* ``q_rows, kv_rows [padded]``: the caller's flat row of every kernel position, -1 for
  padding. A ``gathered`` plan (`gathered`) tells a backend that q/k/v and the outputs stay in
  the caller's order and the kernels read and write rows through these vectors: no permuted
  copies of the tensors (neighborhood attention on the GPU).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import block_map as block_map_lib
from . import masks as masks_lib
from .layout import SequenceLayout, TiledLayout


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionPlan:
  q_layout: SequenceLayout | TiledLayout
  kv_layout: SequenceLayout | TiledLayout
  block_map: block_map_lib.BlockMap
  q_lo: np.ndarray
  q_hi: np.ndarray
  kv_c: np.ndarray
  q_index: np.ndarray
  kv_index: np.ndarray
  mask_fn: masks_lib.Mask | None
  q_rows: np.ndarray
  kv_rows: np.ndarray
  gathered: bool = False
  # The mask the plan was made for (kernels that re-tile a plan, e.g. per-warpgroup query
  # rows of the Mosaic GPU forward, build block maps of their own from it).
  mask: masks_lib.Mask | None = None
  union: tuple | None = None
  # The interval vectors hold `terms` terms of num_mask_dims // terms dims each, a pair
  # attending where every dim of some term holds (`intervals_per_term`); 1: one term.
  terms: int = 1

  @property
  def num_mask_dims(self) -> int:
    return self.q_lo.shape[0]

  @property
  def block_q(self) -> int:
    return self.q_layout.block

  @property
  def block_kv(self) -> int:
    return self.kv_layout.block


def _tiled_intervals(mask: masks_lib.Neighborhood, q_layout: TiledLayout, kv_layout: TiledLayout):
  los, his, cs = [], [], []
  for dim in range(q_layout.ndim):
    length = mask.spatial_shape[dim]
    args = (length, mask.kernel_size[dim], mask.stride[dim], mask.dilation[dim],
            mask.is_causal[dim])
    xq, vq = q_layout.mask_coords(dim, length)
    lo, hi = masks_lib.gna_bounds_1d(xq, *args)
    lo = np.where(vq, lo, masks_lib.EMPTY_LO)
    hi = np.where(vq, hi, masks_lib.EMPTY_HI)
    xk, vk = kv_layout.mask_coords(dim, length)
    c = np.where(vk, masks_lib.gna_coord_1d(xk, length, mask.dilation[dim]),
                 masks_lib.PAD_COORD)
    los.append(q_layout.per_token(lo, dim))
    his.append(q_layout.per_token(hi, dim))
    cs.append(kv_layout.per_token(c, dim))
  return (np.stack(los).astype(np.int32), np.stack(his).astype(np.int32),
          np.stack(cs).astype(np.int32))


def interval_vectors(mask: masks_lib.Mask, q_layout, kv_layout):
  """``(q_lo, q_hi, kv_c)`` of an interval mask on these layouts (see the module doc), or
  None for masks with no interval form."""
  if isinstance(mask, masks_lib.Neighborhood) and isinstance(q_layout, TiledLayout):
    return _tiled_intervals(mask, q_layout, kv_layout)
  if not mask.is_interval:
    return None
  q_index, q_valid = q_layout.token_index()
  kv_index, kv_valid = kv_layout.token_index()
  return masks_lib.per_token_intervals(mask, q_index, kv_index, q_valid, kv_valid)


@functools.lru_cache(maxsize=256)
def make_plan(mask: masks_lib.Mask, q_layout, kv_layout) -> AttentionPlan:
  bmap = block_map_lib.build(mask, q_layout, kv_layout)
  q_index, q_valid = q_layout.token_index()
  kv_index, kv_valid = kv_layout.token_index()
  union = _union(mask, q_layout, kv_layout, q_index, q_valid, kv_index, kv_valid)
  mask_fn = None
  vectors = interval_vectors(mask, q_layout, kv_layout)
  if vectors is not None:
    lo, hi, c = vectors
  else:
    # Validity only; the mask itself runs elementwise.
    lo, hi, c = masks_lib.per_token_intervals(masks_lib.Causal(0), np.zeros_like(q_index),
                                              np.zeros_like(kv_index), q_valid, kv_valid)
    mask_fn = mask
    if q_layout.is_shard or kv_layout.is_shard:
      # Kernels evaluate mask_fn on their positions: map them to the global indices.
      mask_fn = masks_lib.Remapped(mask, q_layout.segments or ((0, q_layout.seq_len),),
                                   kv_layout.segments or ((0, kv_layout.seq_len),))
      q_index = np.minimum(np.arange(q_layout.padded_len), q_layout.seq_len - 1)
      kv_index = np.minimum(np.arange(kv_layout.padded_len), kv_layout.seq_len - 1)
  # A shard of a larger problem (context parallelism) keeps no mask: kernels that re-derive
  # layouts from a Neighborhood's grid would take the global grid for the local tensor.
  shard = q_layout.is_shard or kv_layout.is_shard
  return AttentionPlan(q_layout, kv_layout, bmap, lo, hi, c, q_index.astype(np.int32),
                       kv_index.astype(np.int32), mask_fn, q_layout.rows().astype(np.int32),
                       kv_layout.rows().astype(np.int32), mask=None if shard else mask,
                       union=union)


def _union(mask, q_layout, kv_layout, q_index, q_valid, kv_index, kv_valid):
  """`AttentionPlan.union` (None where the mask is one term whose dims do not merge, or the
  layouts are not sequences), from the layouts' token indices (global ones on a shard)."""
  if not (isinstance(q_layout, SequenceLayout) and isinstance(kv_layout, SequenceLayout)):
    return None
  terms = masks_lib.interval_terms(mask)
  if terms is None:
    return None
  lo, hi, c = masks_lib.union_intervals(terms, q_index, kv_index, q_valid, kv_valid)
  if len(terms) == 1 and lo.shape[0] >= terms[0].num_dims:
    return None
  return len(terms), lo, hi, c


@functools.lru_cache(maxsize=256)
def intervals_per_term(plan: AttentionPlan, every_union: bool = False) -> AttentionPlan:
  """For kernels that test a mask function element by element (Triton, TPU): a plan whose
  mask function holds explicit arrays (`masks.RowBounds` inside ``|``: a `from_array` mask
  with rows of several runs), which a kernel cannot trace, or with `every_union` any union
  of interval masks (``causal & (window | sink)``), becomes its union's per-term interval
  vectors (``terms`` > 1, no mask function; on a context-parallel shard the vectors hold
  global positions, as the mask function would). Other plans are returned as they are."""
  fn = plan.mask_fn.mask if isinstance(plan.mask_fn, masks_lib.Remapped) else plan.mask_fn
  if plan.union is None or fn is None or not (
      every_union or any(True for _ in masks_lib.array_terms(fn))):
    return plan
  terms, lo, hi, c = plan.union
  return dataclasses.replace(plan, q_lo=lo, q_hi=hi, kv_c=c, mask_fn=None, terms=terms)


@functools.lru_cache(maxsize=256)
def gathered(plan: AttentionPlan, value: bool = True) -> AttentionPlan:
  """The same plan, with q/k/v/outputs in the caller's flat order (see the module doc), or
  back in kernel order (``value=False``). Cached: kernels cache host work per plan."""
  return dataclasses.replace(plan, gathered=value)


def walked_map(plan: AttentionPlan, block_map=None):
  """The block map a kernel walks: the plan's, or a runtime one (`block_map.from_selection`:
  content-routed attention), which takes 1-D plans only (sequence layouts, not gathered)."""
  if block_map is None:
    return plan.block_map
  if plan.gathered or plan.block_map.partial_groups != (None,):
    raise ValueError("runtime block maps take 1-D (sequence) plans")
  return block_map


def any_term(test, dims, terms: int = 1):
  """OR over `terms` equal runs of `dims` of AND over each run's ``test(d)`` (an interval
  mask is one term; `intervals_per_term` plans hold several); None where `dims` is empty."""
  dims = list(dims)
  per, out = len(dims) // max(terms, 1), None
  for t in range(terms if dims else 0):
    term = None
    for d in dims[t * per:(t + 1) * per]:
      term = test(d) if term is None else term & test(d)
    out = term if out is None else out | term
  return out


def element_mask(plan: AttentionPlan, q_pos, kv_pos, xp):
  """Element mask for kernel positions ``q_pos`` x ``kv_pos`` (broadcastable int arrays).

  Used by the XLA backend; Pallas kernels do the same on loaded slices.
  """
  lo, hi, c = xp.asarray(plan.q_lo), xp.asarray(plan.q_hi), xp.asarray(plan.kv_c)

  def test(d):
    cd = c[d][kv_pos]
    return (lo[d][q_pos] <= cd) & (cd <= hi[d][q_pos])

  out = any_term(test, range(plan.num_mask_dims), plan.terms)
  if plan.mask_fn is not None:
    out = out & plan.mask_fn(xp.asarray(plan.q_index)[q_pos], xp.asarray(plan.kv_index)[kv_pos])
  return out
