"""Geometry of the Hopper kernels' TMA copies: which box of the caller's
[batch, *spatial, heads, head_dim] layout a block is (`_Boxes`), whether a layout's blocks are
boxes (`_box_layout`), the views and box groups the copies take, and kernel/caller order for
plans that are not boxes (a permuted copy)."""
from __future__ import annotations

import dataclasses

import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_sparse_attn.layout import SequenceLayout

from .config import swizzle_columns


@dataclasses.dataclass(frozen=True)
class _Boxes:
  """Blocks of a plan side as boxes of a [batch, *spatial, heads, head_dim] view."""
  spatial: tuple[int, ...]   # the view's spatial shape
  tile: tuple[int, ...]      # one block
  grid: tuple[int, ...]      # blocks per dim (row-major block ids)

  def origin(self, block_id):
    """Spatial origin of block `block_id` (a traced int32 scalar)."""
    coords, rest = [], block_id
    for n, t in zip(reversed(self.grid), reversed(self.tile)):
      coords.append(lax.rem(rest, n) * t)
      rest = lax.div(rest, n)
    return coords[::-1]

  def rows(self, origin, tile=None):
    """The box at `origin` as TMA copies of contiguous rows: (first row in the box, the
    row's index into the spatial dims) per leading coordinate (interpret mode has no
    reshaped shared-memory refs, so one copy per row of the last dim)."""
    tile = tile or self.tile
    out = []
    for i, lead in enumerate(np.ndindex(*tile[:-1])):
      index = tuple(o + c for o, c in zip(origin, lead)) + (pl.ds(origin[-1], tile[-1]),)
      out.append((i * tile[-1], index))
    return out


def _boxes(layout) -> _Boxes | None:
  """The box geometry of a layout, or None if its blocks are not boxes (dilation)."""
  if isinstance(layout, SequenceLayout):
    return _Boxes((layout.padded_len,), (layout.block,), (layout.num_blocks,))
  if any(d != 1 for d in layout.dilation):
    return None
  return _Boxes(tuple(layout.spatial_shape), tuple(layout.tile_shape), tuple(layout.tile_grid))


def _half_tile(tile: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
  """A 128-row tile as two 64-row boxes: the tile with its first non-unit dim halved."""
  dim = next(i for i, t in enumerate(tile) if t > 1)
  half = list(tile)
  half[dim] //= 2
  return tuple(half), dim


def _box_layout(layout) -> bool:
  """Whether a gathered plan's blocks can be read as TMA boxes of the caller's layout (else
  the forward permutes into kernel order: dilation, tiles or a last spatial dim that is not
  a multiple of 8 tokens, or leading spatial dims that the tile does not divide).

  Only the last spatial dim may end in a partial tile. A row copy integer-indexes the
  leading spatial dims, and Mosaic collapses integer-indexed dims (with batch and head)
  into one TMA dim, so a row past the end of a leading dim is not clipped: it lands in the
  next batch or leading index. On the H100 a 9x22x24 grid with 2x8x8 query tiles stored
  such rows over valid output (docs/experiments/h100-2026-11-23-box-checks.json, both copy forms);
  the last dim is a real TMA dim, clipped and zero-filled."""
  boxes = _boxes(layout)
  # Mosaic tiles the last spatial dim of the caller's array by 8 rows for these copies.
  return (boxes is not None and boxes.spatial[-1] % 8 == 0 and boxes.tile[-1] % 8 == 0
          and _half_tile(boxes.tile)[0][-1] % 8 == 0
          and all(s % t == 0 for s, t in zip(boxes.spatial[:-1], boxes.tile[:-1])))


def kernel_order(x, layout):
  """[batch, n, ...] in the caller's flat order -> [batch, padded_len, ...] in kernel order
  (spatial tiles, zero padding)."""
  return layout.to_kernel(x.reshape((x.shape[0], *layout.spatial_shape, *x.shape[2:])))


def caller_order(y, layout):
  """Inverse of `kernel_order`: [batch, padded_len, ...] -> [batch, n, ...]."""
  return layout.from_kernel(y).reshape((y.shape[0], -1, *y.shape[2:]))


def _view(x, boxes: _Boxes):
  """[batch, n, heads, d] -> [batch, *spatial, heads, d]."""
  return x.reshape((x.shape[0], *boxes.spatial, *x.shape[2:]))


def _groups_of_8(tile: tuple[int, ...]) -> tuple[int, ...] | None:
  """A 2-D/3-D tile's extents with its last dim in groups of 8 rows, less unit dims (the
  shared-memory slot's box dims before its [8, 64] swizzle tiles), or None."""
  if len(tile) < 2 or tile[-1] % 8:
    return None
  return tuple(n for n in (*tile[:-1], tile[-1] // 8) if n > 1)


def _box_groups(tile: tuple[int, ...]) -> tuple[int, ...] | None:
  """A KV tile's extents in groups of 8 rows, (*tile[:-1], tile[-1] // 8) less its unit
  dims, where one TMA copy can take it (else None). A copy strides over at most 5 dims: the
  integer-indexed ones (batch, head, unit dims, the 64-column part) collapse into one, 8 x
  64 is the swizzle tile, which leaves 2: 4x4x8 and 8x16 tiles are boxes, 2x4x16 is not,
  and nor are 1-D blocks (their one copy per tile is already a box)."""
  groups = _groups_of_8(tile)
  return groups if groups and len(groups) <= 2 else None


def _window_groups(tile: tuple[int, ...]) -> tuple[int, ...] | None:
  """`_box_groups` for window boxes, whose copies go through the raw view (`_window_view`,
  the slot untiled): it strides over the tile's non-unit dims and the 64 columns, so up to
  3 non-unit dims fit the TMA's 5 (2x4x16 does)."""
  if sum(n > 1 for n in tile) > 3:
    return None
  return _groups_of_8(tile) or None


def _box_view(x, boxes: _Boxes):
  """[batch, n, heads, d] -> the box copies' view [batch, *spatial[:-1], last // 8, 8,
  heads, d // w, w] (w: the swizzle group's columns, `config.swizzle_columns`)."""
  b, _, h, d = x.shape
  w = swizzle_columns(d)
  return x.reshape((b, *boxes.spatial[:-1], boxes.spatial[-1] // 8, 8, h, d // w, w))


def _window_view(x, boxes: _Boxes):
  """[batch, n, heads, d] -> window boxes' view [batch, *spatial, heads, d // w, w]: a box
  starts anywhere along the last dim (its 8 rows are the swizzle tile's)."""
  b, _, h, d = x.shape
  w = swizzle_columns(d)
  return x.reshape((b, *boxes.spatial, h, d // w, w))


def box_slots(stages: int, parts: int, box: tuple[int, ...], width: int, dtype,
              window_tile: tuple[int, ...] | None = None):
  """Shared memory for K/V tiles taken by box copies: [stages, parts, *box, 8, w] with unit
  tiling over the box dims (each part folds to [rows, w] for the wgmmas) and the swizzle of
  its w columns. With ``window_tile`` (boxes at any origin, `_window_view`) the same bytes
  also untiled, [stages, parts, *tile less unit dims, w], as a `plgpu.RefUnion` (tiled,
  raw): Mosaic's tiled copies start a tiled dim only on a multiple of its 8 rows, so the
  copies write through the raw view."""
  tiled = plgpu.SMEM((stages, parts, *box, 8, width), dtype,
                     transforms=(plgpu.TilingTransform((1,) * len(box) + (8, width)),
                                 plgpu.SwizzleTransform(2 * width)))
  if window_tile is None:
    return tiled
  raw = plgpu.SMEM((stages, parts, *(n for n in window_tile if n > 1), width), dtype,
                   transforms=(plgpu.SwizzleTransform(2 * width),))
  return plgpu.RefUnion(tiled, raw)


def copy_box(src, dst, slot, batch, kv_head, origin, geometry: _Boxes, parts: int,
             box: tuple | None, bar):
  """The TMA copies of the K (or V) box of `geometry.tile` at spatial `origin` (traced; any
  offset) into `dst`'s `slot`, each arriving on `bar`. With box groups ``box``: src is a
  `_window_view` [b, *spatial, hkv, parts, w] and dst the raw view of `box_slots`, one copy
  per part; else src is a `_view` [b, *spatial, hkv, d] and dst [stages, rows, d], one copy
  per row of the box's last dim."""
  if box is not None:
    index = tuple(pl.ds(o, n) if n > 1 else o for o, n in zip(origin, geometry.tile))
    for i in range(parts):
      plgpu.copy_gmem_to_smem(src.at[(batch, *index, kv_head, i, slice(None))], dst.at[slot, i],
                              bar)
    return
  for r, index in geometry.rows(origin):
    plgpu.copy_gmem_to_smem(src.at[(batch, *index, kv_head)],
                            dst.at[slot, pl.ds(r, geometry.tile[-1])], bar)
