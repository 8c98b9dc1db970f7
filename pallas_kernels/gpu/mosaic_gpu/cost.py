"""The Hopper forward's tile cost model: which KV scheme (grid tiles, per-warpgroup lists,
window-anchored boxes) and which tiles a neighborhood runs with (`tile_costs`, `auto_tiles`),
fitted on the H100 (docs/performance.md)."""
from __future__ import annotations

import functools
import math

import numpy as np

from jax_sparse_attn import masks
from jax_sparse_attn.layout import TiledLayout
from jax_sparse_attn.plan import AttentionPlan

from .. import mma_masks
from .config import _ROWS, _config
from .boxes import _box_groups, _box_layout, _half_tile, _window_groups
from .tables import _SPLIT_MAX_WIDTH, _split_inputs, _window_inputs

# Cost of a 64x64 unit of work (one warpgroup's step over 64 keys) relative to 128-key
# blocks with one list per 128-row tile, fitted on the H100 (bf16, D=128, 2-D/3-D NA and
# their stride k/2 forms; docs/experiments/h100-2026-11-23-split.json): 64-key blocks cost
# ~1.09-1.22x per unit; per-warpgroup lists another ~1.1-1.2x (their extra loads: a step
# may bring two KV tiles, and the MMA bias runs on full blocks too). So per-warpgroup lists
# pay only where they skip >= ~20% of the work: short strided rows, not dense windows.
_KV64_COST = 1.15
_SPLIT_COST = 1.38
# Each TMA copy of a KV tile (for K and for V) costs the memory warpgroup time the step
# waits on: perfectly block-sparse 3-D (stride = kernel, all blocks full, H100,
# docs/experiments/h100-2026-11-23-rows.json) ran 1.99 / 1.96 ms with a copy per row of the KV tile
# (16 rows of 8 tokens), 1.87 / 1.85 ms with 8 rows of 16, 1.75 ms as 1-D blocks (one copy):
# ~0.9% of a 128-key step per copy, in the units above (4 per 128-key step) per copy and
# load. Box copies (`_box_groups`) take 2 per tile (64 columns each, D = 128).
_TMA_COPY_COST = 0.037


# Layouts that are not TMA boxes (`_box_layout`: dilation, ragged leading dims) run on a
# permuted copy: q, k, v in and the output out through XLA, ~0.3 ms for 2-D 128x128, B=2,
# H=16, D=128 on the H100 (docs/experiments/h100-2026-11-23-ours.json, "token permutation only"):
# ~0.18 units per token and head, a third of the 2-D NA forward.
_PERMUTE_COST = 0.18


def _tma_copies(kv_tile) -> int:
  """TMA copies per K (or V) tile: 2 as a box (D = 128), else one per row."""
  return 2 if _box_groups(kv_tile) is not None else math.prod(kv_tile[:-1])


def _split_pays(bmap, split_counts) -> bool:
  """Whether per-warpgroup lists beat one list per tile for this map (`_SPLIT_COST`)."""
  union = 2 * int(np.sum(bmap.kv_counts))
  per_warpgroup = int(np.sum(split_counts[:, 2]) + np.sum(split_counts[:, 3]))
  return _SPLIT_COST * per_warpgroup < _KV64_COST * union


def window_lists(plan: AttentionPlan, scale: float, config=None):
  """`_window_inputs` where the forward runs window-anchored KV boxes for `plan` under
  `config` (`MosaicGPUConfig.kv_windows`: True where they apply; None where `window_pays`),
  else None. Not with per-warpgroup lists (``split=True``)."""
  cfg = _config(config)
  if not (cfg.mask_mma and cfg.kv_windows is not False and not cfg.split and plan.gathered
          and isinstance(plan.mask, masks.Neighborhood)
          and isinstance(plan.q_layout, TiledLayout)):
    return None
  if cfg.kv_windows is None and not window_pays(plan.mask, plan.q_layout.tile_shape,
                                                plan.kv_layout.tile_shape):
    return None
  return _window_inputs(plan, scale)


def split_lists(plan: AttentionPlan, scale: float, config=None):
  """`_split_inputs` where the forward runs per-warpgroup lists for `plan` under `config`
  (`MosaicGPUConfig.split`: True where they apply; None with 64-key KV blocks where
  `_split_pays`), else None."""
  cfg = _config(config)
  if not (cfg.mask_mma and cfg.split is not False and plan.gathered
          and (cfg.split or plan.block_kv == _ROWS)):
    return None
  split = _split_inputs(plan, scale)
  if cfg.split is None and split is not None and not _split_pays(plan.block_map, split[3]):
    return None
  return split


@functools.lru_cache(maxsize=64)
def window_dq_tile(plan: AttentionPlan, force: bool = False) -> tuple[int, ...] | None:
  """The 128-key KV tile whose window-anchored boxes cost the backward's dQ kernel least for
  a gathered neighborhood plan's query tiles (`tile_costs`' "window", then the squarer tile),
  where that costs less than the plan's own map read in kernel order (its visited and full
  blocks in the same units, one copy per K load; ``force``: wherever they apply), else None.
  Strided windows on a key grid that holds only interior windows whole
  (`ops._backward_plan`): 3-D k8×16² stride 4×8×8 visits 10368 blocks (6272 full) on that
  grid, 8192 (all full) as anchored boxes."""
  from jax_sparse_attn.simulate import candidate_tiles
  mask = plan.mask
  if not isinstance(mask, masks.Neighborhood):  # (1-D plans' layouts have no tiles)
    return None
  tq = plan.q_layout.tile_shape
  if math.prod(tq) != 2 * _ROWS:
    return None
  best = None
  for kt in candidate_tiles(mask, 2 * _ROWS, last_multiple=8):
    cost = tile_costs(mask, tuple(tq), kt).get("window")
    key = None if cost is None else (cost, max(kt) / min(kt))
    if key is not None and (best is None or key < best[0]):
      best = (key, kt)
  if best is None:
    return None
  bmap = plan.block_map
  own = list_cost(int(np.sum(bmap.kv_counts)), int(np.sum(bmap.kv_full_counts)), 1,
                  2 * _ROWS, mma=True)
  return best[1] if force or best[0][0] < own else None


def list_cost(visited: int, full: int, copies: int, kv_keys: int, mma: bool) -> float:
  """Modeled cost of walking `visited` KV blocks of `kv_keys` keys (`full` of them unmasked),
  in the units of `tile_costs`: partial blocks as in the simulator's model (``mma``: the MMA
  bias, else the element test), 64-key blocks at `_KV64_COST`, and `copies` TMA copies per
  K (or V) load at `_TMA_COPY_COST` each."""
  from jax_sparse_attn.simulate import PARTIAL_BLOCK_COST, PARTIAL_BLOCK_COST_MMA
  partial_cost = PARTIAL_BLOCK_COST_MMA if mma else PARTIAL_BLOCK_COST
  rate = 2 * kv_keys // _ROWS * (1.0 if kv_keys > _ROWS else _KV64_COST)
  return (full + partial_cost * (visited - full)) * rate + _TMA_COPY_COST * copies * visited


@functools.lru_cache(maxsize=4096)
def tile_costs(mask, q_tile: tuple, kv_tile: tuple) -> dict:
  """Modeled forward cost of a tiling per KV scheme, in 64x64 units of one warpgroup step
  (`_SPLIT_COST`): "grid" (one KV list per query tile over grid tiles), "split"
  (per-warpgroup lists, 64-key tiles), "window" (window-anchored boxes, `_window_inputs`),
  each where it applies. Visited-block counts are the simulator's, partial blocks cost as
  in its model (the MMA bias, or the element test past 32 one-hot columns), and every KV
  load adds the cost of its TMA copies (`_TMA_COPY_COST`)."""
  from jax_sparse_attn.simulate import mma_columns, visited_blocks, window_blocks
  kv = math.prod(kv_tile)
  half = _half_tile(q_tile)[0]
  mma = mma_columns(q_tile) <= mma_masks.MAX_WIDTH
  one_list = lambda visited, full, copies: list_cost(visited, full, copies, kv, mma)

  visited, full = visited_blocks(mask, q_tile, kv_tile)
  copies = _tma_copies(kv_tile)
  costs = {"grid": one_list(visited, full, copies)}
  if kv == _ROWS and mma_columns(half) <= _SPLIT_MAX_WIDTH:
    costs["split"] = (visited_blocks(mask, half, kv_tile)[0] * _SPLIT_COST
                      + _TMA_COPY_COST * copies * visited)
  # Window boxes on the GPU take box copies (2 per tile) or do not run.
  window = window_blocks(mask, q_tile, kv_tile) if mma and _window_groups(kv_tile) else None
  if window is not None:
    costs["window"] = one_list(*window, 2)
  return costs


def window_pays(mask, q_tile: tuple, kv_tile: tuple) -> bool:
  """Whether window-anchored KV boxes cost less than grid tiles (`tile_costs`)."""
  costs = tile_costs(mask, tuple(q_tile), tuple(kv_tile))
  return "window" in costs and costs["window"] < min(v for k, v in costs.items() if k != "window")


@functools.lru_cache(maxsize=256)
def auto_tiles(mask, block_q: int, block_kv: int, segments: bool = False):
  """(q tile, kv tile) for `na`'s defaults: the lowest modeled cost (`tile_costs`, over its
  KV schemes; ``segments``, a padding mask or segment ids: grid tiles with the element test,
  `_forward_cost`) over 128-row query tiles that are TMA boxes (last dim, and that of the
  half tile, a multiple of 8) and KV tiles of `block_kv` keys, or of 64 keys when `block_kv`
  is 128; tiles that are not boxes of the layout (ragged leading dims) add the permuted copy
  (`_PERMUTE_COST`)."""
  from jax_sparse_attn.simulate import best_tile_shapes, candidate_tiles
  tiles = lambda n: candidate_tiles(mask, n, last_multiple=8)
  q_cands = [t for t in tiles(block_q) if _half_tile(t)[0][-1] % 8 == 0]
  kv_sizes = (block_kv, _ROWS) if block_kv == 2 * _ROWS else (block_kv,)
  best, best_key = None, None
  is_box = lambda t: _box_layout(TiledLayout(mask.spatial_shape, mask.dilation, t))
  for qt in q_cands if block_q == 2 * _ROWS else ():
    q_box = is_box(qt)
    for kv in kv_sizes:
      for kt in tiles(kv):
        cost = _forward_cost(mask, (qt, kt), segments)
        if not (q_box and is_box(kt)):
          cost += _PERMUTE_COST * mask.num_tokens
        key = (cost, max(qt) / min(qt) + max(kt) / min(kt))
        if best_key is None or key < best_key:
          best, best_key = (qt, kt), key
  if best is None:  # no box tiles: the simulator's choice (the forward permutes)
    return best_tile_shapes(mask, block_q, block_kv, last_multiple=8)
  return best


# The backward's tiles for 2-D neighborhoods count the 64x64 quarters its kernels compute
# (`policy.QUARTERS` skips the dead ones) instead of the simulator's blocks: among
# the tilings that visit no more blocks than the simulator's, the one with the fewest live
# quarters. 2-D 128² k33: (16, 8) tiles (8x8 halves) over the same 1920 blocks leave 6400
# live quarters instead of 6912. H100, B=2, H=16, fwd+bwd ms, these / the simulator's tiles
# (`benchmarks/diag/diag_backward_tiles.py`, docs/experiments/h100-2026-12-06-backward-tiles
# .json, two rounds): 128² k33 4.32-4.27 / 4.47-4.41, dilation 2 4.75-4.71 / 5.11-5.07,
# causal along h 3.95-3.90 / 4.02-4.03, at head_dim 64 (96², B=4, H=8) 1.56 / 1.60, k17
# dilation 4 3.09 / 3.10, 56² k7 1.18 / 1.28. False: the simulator's tiles.
QUARTER_TILES = True
# Tilings whose tiles both take the MMA bias (`mma_masks.bias_fits`) come first, where the
# simulator's tiles do not up to this many times their visited blocks; the kernels test
# elements on the others' partial blocks. 2-D 128² k17 dilation 4: the quarters alone
# picked (4, 32) tiles (640 blocks, 2304 live quarters, element tests) over (16, 8) (768
# blocks, the same quarters, the MMA bias): H100, fwd+bwd 3.00-3.04 ms against 2.38-2.40
# with (16, 8) for both passes (docs/experiments/h100-2026-12-06-backward-tiles-both.json).
# Among biased tilings with as many live quarters, (8, 16) query tiles (4x16 halves) ran
# 2.82-2.84 ms (-12-06-tile-rules.json): ties go to square halves. 0: the quarters alone.
BIAS_BLOCKS_SLACK = 1.25
# The forward takes the backward's tiles (one plan, no second kernel-order copy) where the
# Hopper backward runs a 2-D window on tiles of its own, unless they would cost the forward
# its TMA boxes (the forward's own tiles are boxes of the layout and the backward's are
# not: 56² k7's (16, 8)). H100, fwd+bwd ms, the backward's tiles for both passes / the
# forward's own (-12-06-backward-tiles.json, -backward-tiles-both.json): 128² k33 dilation
# 2 4.52-4.63 / 4.71-4.75, k33 4.25-4.30 / 4.27-4.32, causal along h 3.88-3.91 /
# 3.90-3.95, at head_dim 64 1.57 / 1.56. False: each pass its own tiles.
SHARED_TILES = True


def backward_tile_shapes(mask, block_q: int, block_kv: int):
  """(query tile, key tile) of the backward's plan for a neighborhood (`ops._backward_plan`):
  the simulator's best (`simulate.best_tile_shapes`), or for 2-D windows on the two 128-row
  kernels (where they skip dead quarters, `QUARTER_TILES`) the tiling with the fewest live
  64x64 quarters (`_live_quarter_count`) among those that visit no more blocks than the
  simulator's, ties to the squarest 64-row halves, then the simulator's; tilings that take
  the MMA bias on both sides (`mma_masks.bias_fits` for a 128-row tile) first, where the
  simulator's do not up to `BIAS_BLOCKS_SLACK` times its blocks."""
  from jax_sparse_attn.simulate import best_tile_shapes, candidate_tiles, visited_blocks
  base = best_tile_shapes(mask, block_q, block_kv)
  if not (QUARTER_TILES and isinstance(mask, masks.Neighborhood) and mask.num_dims == 2
          and (block_q, block_kv) == (2 * _ROWS, 2 * _ROWS)):
    return base
  limit = visited_blocks(mask, *base)[0]
  biased = lambda tiles: all(mma_masks.bias_fits(t, block_q) for t in tiles)
  cands = candidate_tiles(mask, block_q, last_multiple=8)
  slack = 1.0 if biased(base) else max(1.0, BIAS_BLOCKS_SLACK)

  def key(tiles):  # None: not a candidate
    blocks = visited_blocks(mask, *tiles)[0]
    bias = biased(tiles)
    if blocks > (slack * limit if bias else limit):
      return None
    squareness = sum(max(h) / min(h) for h in (_half_tile(t)[0] for t in tiles))
    return (not (bias and BIAS_BLOCKS_SLACK), _live_quarter_count(mask, *tiles), squareness)

  best, best_key = tuple(base), key(tuple(base))
  for qt in cands:
    for kt in cands:
      k = key((qt, kt))
      if k is not None and k < best_key:
        best, best_key = (qt, kt), k
  return best


# `SHARED_TILES` takes the backward's tiles only where the forward's modeled cost on them
# (`_forward_cost`) is at most this much above its own tiles' (less the kernel-order copy
# they save where its own tiles are no boxes).
# 2-D 64² k13 without the Triton kernels: the backward's (8, 16)/(16, 8) tiles model the
# forward 29% above its own (8, 16)/(4, 32) and ran it 21% slower (H100, 0.41 vs 0.34 ms,
# docs/experiments/h100-2026-12-06-narrow-backward.json); 128² k33 ties (equal costs).
# With a padding mask or segment ids the forward runs grid tiles with the element test (no
# window boxes, no MMA bias), and the cost compares those: 96² k17 with 16 padded columns
# ran its forward in 0.39 ms on the backward's tiles, 0.52-0.61 on its tiles for window
# boxes (-12-06-share-rule.json) and 0.37-0.38 on its tiles for the element test, which it
# takes now (-12-06-segment-tiles-no-triton.json).
SHARED_TILES_SLACK = 0.02


def _forward_cost(mask, tiles, segments: bool) -> float:
  """The forward's modeled cost of a tiling (`tile_costs`); with ``segments`` its grid tiles
  with the element test on partial blocks."""
  qt, kt = (tuple(t) for t in tiles)
  if segments:
    from jax_sparse_attn.simulate import visited_blocks
    return list_cost(*visited_blocks(mask, qt, kt), _tma_copies(kt), math.prod(kt), mma=False)
  return min(tile_costs(mask, qt, kt).values())


def shares_backward_tiles(mask, forward_tiles, backward_tiles, segments: bool = False) -> bool:
  """Whether the forward runs on the backward's tiles (`SHARED_TILES`): 2-D windows on the
  Hopper backward (128-token tiles; Triton's backward takes others) whose backward tiles
  keep the forward's TMA boxes or whose forward tiles are no boxes, where the forward's
  modeled cost on them (``segments``: a padding mask or segment ids) is within
  `SHARED_TILES_SLACK` of its own tiles' (less the kernel-order copy one plan saves where
  the forward's tiles are no boxes)."""
  if not (SHARED_TILES and isinstance(mask, masks.Neighborhood) and mask.num_dims == 2
          and all(math.prod(t) == 2 * _ROWS for t in backward_tiles)):
    return False
  box = lambda t: _box_layout(TiledLayout(mask.spatial_shape, mask.dilation, t))
  own_boxes = all(box(t) for t in forward_tiles)
  if own_boxes and not all(box(t) for t in backward_tiles):  # the forward's boxes kept
    return False
  cost = lambda tiles: _forward_cost(mask, tiles, segments)
  saved = 0.0 if own_boxes else _PERMUTE_COST * mask.num_tokens
  return cost(backward_tiles) <= (1 + SHARED_TILES_SLACK) * cost(forward_tiles) + saved


@functools.lru_cache(maxsize=256)
def _live_quarter_count(mask, q_tile: tuple, kv_tile: tuple) -> int:
  """64x64 quarters the backward's dK/dV kernel computes on this tiling: the live ones
  (`tables.live_quarters`) where it skips the dead (at least
  `policy.QUARTERS_MIN_DEAD` of them), else four per visited block."""
  from jax_sparse_attn.plan import make_plan
  from . import policy
  plan = make_plan(mask, TiledLayout(mask.spatial_shape, mask.dilation, q_tile),
                   TiledLayout(mask.spatial_shape, mask.dilation, kv_tile))
  bmap = plan.block_map
  quarters = policy.dead_quarters(_config(None), plan, bmap)  # the kernel's rule
  if quarters is None:
    return 4 * int(np.asarray(bmap.q_counts).sum())
  return policy.quarter_counts(bmap, quarters[1])[0]
