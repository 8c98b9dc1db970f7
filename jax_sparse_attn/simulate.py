"""Speedup simulator for (generalized) neighborhood attention: the GNA paper's analytical model.

For a problem and a tiling it reports the useful-FLOP density and ideal speedup over dense
attention, and the block-level bound: dense blocks / visited blocks, with full and partial
block counts. Tiled blocks are products of per-dimension tile ranges, so every count is a
product of exact one-dimensional counts: the simulator is exact and fast.

    python -m jax_sparse_attn.simulate --shape 128 128 --kernel 33 33
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math

import numpy as np

from . import block_map as block_map_lib
from . import masks as masks_lib
from .layout import TiledLayout, cdiv

# The cost model that picks tile shapes, fitted to the Triton kernels on the H100 (bf16, 2-D
# and 3-D NA forward, 2026-11-23; docs/experiments/h100-2026-11-23-na-*.json). A partial
# block costs more than a full one: ~1.06x when its mask is an MMA bias read from tables
# (one-hot over the query or the key tile, whichever has <= 32 coordinate columns; see
# pallas_kernels.gpu.triton_attention; na-overhead.json: 1.294 ms vs 1.241 with the bias
# zeroed), ~1.55x with the per-element test. Query tiles of 64 rows cost ~1.25x more per
# element than tiles of 128 rows (same file, bias zeroed: 1.347 ms for 26.2M pairs of 64-row
# tiles vs 1.241 ms for 30.1M of 128-row tiles).
PARTIAL_BLOCK_COST = 1.55
PARTIAL_BLOCK_COST_MMA = 1.06
SMALL_Q_TILE_COST = 1.25
MMA_MAX_COLUMNS = 32


def mma_columns(tile_shape) -> int:
  width = sum(t for t in tile_shape if t > 1) or 1
  return max(16, 1 << (width - 1).bit_length())


def partial_block_cost(q_tile_shape, kv_tile_shape=None) -> float:
  width = min(mma_columns(t) for t in (q_tile_shape, kv_tile_shape or q_tile_shape))
  return PARTIAL_BLOCK_COST_MMA if width <= MMA_MAX_COLUMNS else PARTIAL_BLOCK_COST


def tile_cost(mask: masks_lib.Neighborhood, q_tile_shape, kv_tile_shape) -> float:
  """Simulated time of a tiling, in units of one dense 128x64 block."""
  return _blocks_cost(*_counts(mask, tuple(q_tile_shape), tuple(kv_tile_shape)),
                      q_tile_shape, kv_tile_shape)


def _blocks_cost(visited: int, full: int, q_tile_shape, kv_tile_shape) -> float:
  """`tile_cost` of `visited` blocks, `full` of them full."""
  bq, bk = math.prod(q_tile_shape), math.prod(kv_tile_shape)
  blocks = full + partial_block_cost(q_tile_shape, kv_tile_shape) * (visited - full)
  return blocks * bq * bk / (128 * 64) * (SMALL_Q_TILE_COST if bq < 128 else 1.0)


@dataclasses.dataclass(frozen=True)
class SimResult:
  spatial_shape: tuple
  kernel_size: tuple
  stride: tuple
  dilation: tuple
  is_causal: tuple
  block_q: int
  block_kv: int
  q_tile_shape: tuple
  kv_tile_shape: tuple
  tokens: int
  attended_pairs: int
  density: float
  ideal_speedup: float
  dense_blocks: int
  visited_blocks: int
  full_blocks: int
  partial_blocks: int
  block_speedup_bound: float
  # The same tiles with KV boxes anchored at each query tile's window (`window_blocks`; the
  # Hopper kernel's ``kv_windows``), None with dilation.
  window_visited_blocks: int | None = None
  window_full_blocks: int | None = None
  window_speedup_bound: float | None = None

  def as_dict(self):
    return dataclasses.asdict(self)


def _pow2_factorizations(total: int, ndim: int, limits):
  exp = int(math.log2(total))
  for parts in itertools.product(range(exp + 1), repeat=ndim):
    if sum(parts) == exp:
      tile = tuple(1 << p for p in parts)
      if all(t <= lim for t, lim in zip(tile, limits)):
        yield tile


def _tile_limits(mask: masks_lib.Neighborhood):
  return [1 << max(0, (cdiv(s, d) - 1).bit_length())
          for s, d in zip(mask.spatial_shape, mask.dilation)]


def _counts(mask, q_tile, kv_tile):
  q_layout = TiledLayout(mask.spatial_shape, mask.dilation, q_tile)
  kv_layout = TiledLayout(mask.spatial_shape, mask.dilation, kv_tile)
  per_dim = block_map_lib.per_dim_classes(mask, q_layout, kv_layout)
  visited = math.prod(int((c > 0).sum()) for c in per_dim)
  full = math.prod(int((c == block_map_lib.FULL).sum()) for c in per_dim)
  return visited, full


def visited_blocks(mask: masks_lib.Neighborhood, q_tile_shape, kv_tile_shape) -> tuple[int, int]:
  """(visited, full) blocks of a tiling: exact, as products of per-dim counts."""
  return _counts(mask, tuple(q_tile_shape), tuple(kv_tile_shape))


@functools.lru_cache(maxsize=4096)
def window_segments(mask: masks_lib.Neighborhood, dim: int, q_tile: int, kv_tile: int):
  """KV boxes anchored at each query tile's window along one dim (no dilation), or None.

  A grid KV tile starts at a multiple of its extent, so a window that starts elsewhere (a
  strided window: NATTEN centres it on its stride group, e.g. starts 4, 12, 20, ... for
  kernel 16 stride 8) straddles tiles, and blocks that hold no key or some keys of every
  query are visited as partial. Anchored boxes start where the query tile's union window
  starts: each box begins at the next key some query of the tile sees. A box that would run
  past the array is moved back to end at its edge, and keys it shares with the previous box
  are masked in it ("owned" by the previous one), so every key counts once.

  Returns a tuple per query tile along the dim of segments (origin, first owned, last owned,
  full): full when every (valid) query of the tile sees every key of the box; None where a
  box does not fit the dim, or with dilation."""
  size, k, s = mask.spatial_shape[dim], mask.kernel_size[dim], mask.stride[dim]
  if mask.dilation[dim] != 1 or kv_tile > size:
    return None
  out = []
  for g in range(cdiv(size, q_tile)):
    x = np.arange(g * q_tile, min((g + 1) * q_tile, size))
    lo, hi = masks_lib.gna_bounds_1d(x, size, k, s, 1, mask.is_causal[dim])
    seen = np.zeros(size + 1, np.int64)
    np.add.at(seen, lo, 1)
    np.add.at(seen, hi + 1, -1)
    seen = np.cumsum(seen[:-1]) > 0  # keys some query of the tile sees
    segs, nxt = [], 0
    while nxt < size and seen[nxt:].any():
      first = nxt + int(np.argmax(seen[nxt:]))
      origin = min(first, size - kv_tile)
      full = origin == first and bool(np.all(lo <= origin) and np.all(origin + kv_tile - 1 <= hi))
      segs.append((origin, first, origin + kv_tile - 1, full))
      nxt = origin + kv_tile
    out.append(tuple(segs))
  return tuple(out)


def window_blocks(mask: masks_lib.Neighborhood, q_tile_shape, kv_tile_shape):
  """(visited, full) KV boxes anchored at each query tile's window (`window_segments`), the
  Hopper kernel's ``kv_windows``; None where they do not apply. Exact: products of per-dim
  counts, like `visited_blocks`."""
  per_dim = [window_segments(mask, d, q, k)
             for d, (q, k) in enumerate(zip(q_tile_shape, kv_tile_shape))]
  if any(p is None for p in per_dim):
    return None
  visited = math.prod(sum(len(s) for s in p) for p in per_dim)
  full = math.prod(sum(sum(seg[3] for seg in s) for s in p) for p in per_dim)
  return visited, full


def candidate_tiles(mask: masks_lib.Neighborhood, block: int, last_multiple: int = 1):
  """Power-of-two tile shapes of `block` tokens that fit the spatial shape (not far past
  it), whose last dim is a multiple of `last_multiple`. A grid smaller than a block (7×7
  at 128 tokens) has no such tile: then the tiles that pad it least ((8, 16): 128 tokens,
  one block; (1, 128) would pad each of its 7 rows to a block)."""
  limits = [max(l, 1) for l in _tile_limits(mask)]
  fits = list(_pow2_factorizations(block, mask.num_dims, limits))
  if not fits:
    every = list(_pow2_factorizations(block, mask.num_dims, [block] * mask.num_dims))
    padded = {t: TiledLayout(mask.spatial_shape, mask.dilation, t).padded_len for t in every}
    least = min(padded.values())
    fits = [t for t in every if padded[t] == least]
  return [t for t in fits if t[-1] % last_multiple == 0]


@functools.lru_cache(maxsize=256)
def best_tile_shapes(mask: masks_lib.Neighborhood, block_q: int, block_kv: int,
                     same: bool = False, block_q_options: tuple = (), last_multiple: int = 1):
  """Tile shapes (products block_q and block_kv) that minimise `tile_cost`.

  ``same=True`` (needs block_q == block_kv) returns one tile shape for Q and KV.
  ``block_q_options``: other query block sizes to consider (the product of the returned
  query tile says which won). ``last_multiple``: prefer tiles whose last dim is a multiple
  of it (TMA rows of the Mosaic GPU kernels); ignored where no tile qualifies."""
  for b in (block_q, block_kv) + tuple(block_q_options):
    if not isinstance(b, int) or b <= 0 or b & (b - 1):
      raise ValueError(f"block sizes (block_q, block_kv, block_q_options) must be positive "
                       f"powers of two, got {b!r}")

  def cands(block):
    return candidate_tiles(mask, block, last_multiple) or candidate_tiles(mask, block)

  kv_cands = cands(block_kv)
  best, best_key = None, None
  for bq in (block_q,) + tuple(b for b in block_q_options if b != block_q):
    for qt in cands(bq):
      for kt in kv_cands:
        if same and qt != kt:
          continue
        # Prefer squarer tiles on ties (fewer partial blocks under other masks).
        key = (tile_cost(mask, qt, kt), max(qt) / min(qt) + max(kt) / min(kt))
        if best_key is None or key < best_key:
          best, best_key = (qt, kt), key
  return best


@functools.lru_cache(maxsize=4096)
def _lead_counts(mask: masks_lib.Neighborhood, dim: int, q_tile: int, kv_tile: int,
                 lead: int) -> tuple[int, int]:
  """(visited, full) (query tile, key tile) pairs along `dim` when the key grid's tiles start
  `lead` positions before the array (`lead` padding positions, then the keys)."""
  length = mask.spatial_shape[dim]
  padded = cdiv(length + lead, kv_tile) * kv_tile
  cls = block_map_lib._dim_classes(mask, dim, (length, 0), (padded, -lead), mask.dilation,
                                   q_tile, kv_tile)
  return int((cls > 0).sum()), int((cls == block_map_lib.FULL).sum())


@functools.lru_cache(maxsize=256)
def best_shifted_tiles(mask: masks_lib.Neighborhood, block_q: int, block_kv: int):
  """(query tile, key tile, key lead) minimising `tile_cost` where the key grid may start
  ``lead[d]`` positions before the array along each dim, or None where that cannot help
  (no stride, or dilation). Strided windows start off the tile grid (kernel 16 stride 8:
  NATTEN centres them at 4, 12, 20, ...), so grid tiles straddle them; a key grid that
  starts 4 earlier holds whole windows: full blocks instead of partial ones, and fewer
  (3-D 16×64² k8×16² stride 4×8×8 with 2×8×8 tiles: 10368 blocks instead of 12288, all
  full but the edges'). The backward kernels take such a plan on padded K/V
  (`ops._backward_plan`)."""
  if all(s == 1 for s in mask.stride) or any(d != 1 for d in mask.dilation):
    return None
  best, best_key = None, None
  for qt in candidate_tiles(mask, block_q):
    for kt in candidate_tiles(mask, block_kv):
      per_dim = [[_lead_counts(mask, d, qt[d], kt[d], lead) for lead in range(kt[d])]
                 for d in range(mask.num_dims)]
      for lead in itertools.product(*(range(t) for t in kt)):
        visited = math.prod(per_dim[d][lead[d]][0] for d in range(mask.num_dims))
        full = math.prod(per_dim[d][lead[d]][1] for d in range(mask.num_dims))
        key = (_blocks_cost(visited, full, qt, kt), sum(lead),
               max(qt) / min(qt) + max(kt) / min(kt))
        if best_key is None or key < best_key:
          best, best_key = (qt, kt, lead), key
  return best


def _attended_pairs(mask: masks_lib.Neighborhood) -> int:
  total = 1
  for dim, length in enumerate(mask.spatial_shape):
    x = np.arange(length)
    lo, hi = masks_lib.gna_bounds_1d(x, length, mask.kernel_size[dim], mask.stride[dim],
                                     mask.dilation[dim], mask.is_causal[dim])
    c = masks_lib.gna_coord_1d(x, length, mask.dilation[dim])
    total *= int(((lo[:, None] <= c[None, :]) & (c[None, :] <= hi[:, None])).sum())
  return total


def simulate(spatial_shape, kernel_size, stride=1, dilation=1, is_causal=False, *,
             block_q: int = 128, block_kv: int = 128, q_tile_shape=None,
             kv_tile_shape=None, block_q_options: tuple = ()) -> SimResult:
  """Simulate one problem. Tile shapes default to the best ones for the block sizes
  (`best_tile_shapes`; ``block_q_options`` as there)."""
  mask = masks_lib.neighborhood(spatial_shape, kernel_size, stride, dilation, is_causal)
  if q_tile_shape is None or kv_tile_shape is None:
    bq_t, bk_t = best_tile_shapes(mask, block_q, block_kv,
                                  block_q_options=tuple(block_q_options))
    q_tile_shape = tuple(q_tile_shape or bq_t)
    kv_tile_shape = tuple(kv_tile_shape or bk_t)
  q_tile_shape, kv_tile_shape = tuple(q_tile_shape), tuple(kv_tile_shape)
  visited, full = _counts(mask, q_tile_shape, kv_tile_shape)
  n = mask.num_tokens
  pairs = _attended_pairs(mask)
  dense_blocks = cdiv(n, math.prod(q_tile_shape)) * cdiv(n, math.prod(kv_tile_shape))
  window = window_blocks(mask, q_tile_shape, kv_tile_shape)
  return SimResult(
      mask.spatial_shape, mask.kernel_size, mask.stride, mask.dilation, mask.is_causal,
      math.prod(q_tile_shape), math.prod(kv_tile_shape), q_tile_shape, kv_tile_shape, n, pairs,
      pairs / (n * n), n * n / pairs, dense_blocks, visited, full, visited - full,
      dense_blocks / visited, *(window or (None, None)),
      None if window is None else dense_blocks / window[0])


# Device-memory traffic ceiling on the H100 of the benchmarks: a jitted x + 1 over 1 GiB of
# bf16 moved 2.84-2.86 TB/s (bytes read + written; docs/experiments/h100-2026-11-23-rows*.json).
H100_HBM_TBPS = 2.85


def memory_floor_ms(tokens: int, batch: int, heads: int, head_dim: int, *, kv_heads=None,
                    itemsize: int = 2, tbps: float = H100_HBM_TBPS) -> float:
  """The forward's memory floor: Q, K and V read once and the output written once at `tbps`
  (TB/s), in ms. Sparse speedup over a dense kernel that takes `dense_ms` cannot pass
  ``dense_ms / memory_floor_ms(...)`` however few blocks are visited: blocked and short
  strided rows hit this before the block bound (2-D 128x128 k16 stride 16, B=2, H=16,
  D=128: 0.19 ms, 37x over a 7.0 ms dense forward, against a block bound of 64x)."""
  for name, value in (("tokens", tokens), ("batch", batch), ("heads", heads),
                      ("head_dim", head_dim), ("itemsize", itemsize)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if not tbps > 0:
    raise ValueError(f"tbps must be positive, got {tbps!r}")
  kv_heads = heads if kv_heads is None else kv_heads
  elems = batch * tokens * head_dim * (2 * heads + 2 * kv_heads)
  return elems * itemsize / (tbps * 1e9)


def format_table(results) -> str:
  head = ("shape", "kernel", "stride", "dil", "causal", "Q tile", "KV tile", "density",
          "ideal", "visited", "full", "partial", "bound", "window bound")
  rows = [head]
  for r in results:
    rows.append((
        "x".join(map(str, r.spatial_shape)), "x".join(map(str, r.kernel_size)),
        "x".join(map(str, r.stride)), "x".join(map(str, r.dilation)),
        "".join("T" if c else "F" for c in r.is_causal), "x".join(map(str, r.q_tile_shape)),
        "x".join(map(str, r.kv_tile_shape)), f"{r.density:.3f}", f"{r.ideal_speedup:.1f}x",
        str(r.visited_blocks), str(r.full_blocks), str(r.partial_blocks),
        f"{r.block_speedup_bound:.1f}x",
        "-" if r.window_speedup_bound is None else
        f"{r.window_speedup_bound:.1f}x ({r.window_full_blocks}/{r.window_visited_blocks} full)"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def plot_tiles(res: SimResult, path: str) -> None:
  """Bar chart: block-level bound for every (Q tile, KV tile) candidate, best marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  mask = masks_lib.neighborhood(res.spatial_shape, res.kernel_size, res.stride, res.dilation,
                                res.is_causal)
  rows = []
  for qt in candidate_tiles(mask, res.block_q):
    for kt in candidate_tiles(mask, res.block_kv):
      visited, full = _counts(mask, qt, kt)
      rows.append((f"{'x'.join(map(str, qt))}/{'x'.join(map(str, kt))}",
                   res.dense_blocks / visited, (qt, kt) == (res.q_tile_shape, res.kv_tile_shape)))
  rows.sort(key=lambda r: -r[1])
  rows = rows[:30]
  fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 4))
  ax.bar(range(len(rows)), [r[1] for r in rows],
         color=["tab:orange" if r[2] else "tab:blue" for r in rows])
  ax.axhline(res.ideal_speedup, color="k", ls="--", lw=1, label=f"ideal {res.ideal_speedup:.1f}x")
  ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=90, fontsize=7)
  ax.set_ylabel("block bound (dense / visited blocks)")
  ax.set_title(f"{'x'.join(map(str, res.spatial_shape))} kernel "
               f"{'x'.join(map(str, res.kernel_size))}: Q/KV tiles (chosen in orange)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", type=int, nargs="+", required=True, help="spatial shape")
  parser.add_argument("--kernel", type=int, nargs="+", required=True)
  parser.add_argument("--stride", type=int, nargs="+", default=[1])
  parser.add_argument("--dilation", type=int, nargs="+", default=[1])
  parser.add_argument("--causal", type=int, nargs="+", default=[0])
  parser.add_argument("--block-q", type=int, default=128)
  parser.add_argument("--block-kv", type=int, default=128)
  parser.add_argument("--json", help="write results to this JSON file")
  parser.add_argument("--dense-ms", type=float, help="a dense forward's time on the problem: "
                      "also print the speedups the block bound and the memory floor allow")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--tbps", type=float, default=H100_HBM_TBPS,
                      help="device-memory TB/s for the memory floor")
  parser.add_argument("--plot", help="PNG: block bound of every candidate tile shape "
                      "(needs matplotlib)")
  args = parser.parse_args(argv)
  nd = len(args.shape)
  expand = lambda v: tuple(v) if len(v) == nd else tuple(v) * nd
  res = simulate(tuple(args.shape), expand(args.kernel), expand(args.stride),
                 expand(args.dilation), tuple(bool(c) for c in expand(args.causal)),
                 block_q=args.block_q, block_kv=args.block_kv)
  print(format_table([res]))
  if args.dense_ms:
    floor = memory_floor_ms(res.tokens, args.batch, args.heads, args.head_dim, tbps=args.tbps)
    print(f"dense {args.dense_ms:.3g} ms: block bound {args.dense_ms / res.block_speedup_bound:.3g}"
          f" ms ({res.block_speedup_bound:.1f}x), memory floor {floor:.3g} ms "
          f"({args.dense_ms / floor:.1f}x at {args.tbps} TB/s), so at most "
          f"{min(res.block_speedup_bound, args.dense_ms / floor):.1f}x")
  if args.plot:
    plot_tiles(res, args.plot)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res.as_dict(), f, indent=1)


if __name__ == "__main__":
  main()
