"""Token layouts: how the caller's tokens are ordered and padded for the kernels.

* `SequenceLayout`: 1-D sequences, identity order, padded at the end to a block multiple.
* `TiledLayout`: N-D token grids (neighborhood attention). Per dimension, tokens are first
  split into dilation groups (``x -> (x % d, x // d)``, each group padded to a multiple of the
  tile), then the padded grid is cut into tiles of ``tile_shape`` and ordered tile-major, so
  every kernel block is one spatial tile. A 2-D window then touches few KV blocks, and a
  block is the product of per-dimension ranges (block maps factorize per dimension).

Both expose per-dimension original coordinates of every kernel position (``-1`` for padding)
and jnp functions that move tensors in and out of kernel order (one reshape/transpose copy).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _valid_rows(layout) -> np.ndarray:
  """`token_index`'s flat index where valid, -1 for padding."""
  flat, valid = layout.token_index()
  return np.where(valid, flat, -1)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """``seq_len`` tokens in blocks of ``block``, padded at the end.

  ``segments``: where the tokens sit in a longer global sequence, as ``(global_start,
  length)`` runs in order (lengths sum to ``seq_len``; ``global_start=-1``: rows past the
  sequence's ends, which see nothing and are seen by nothing). Masks are evaluated on
  global indices; the rows of the caller's tensor stay local. Empty: the tokens are the
  whole sequence. Context parallelism uses this for a device's shard (and its halo).
  """
  seq_len: int
  block: int
  segments: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    if self.segments and sum(n for _, n in self.segments) != self.seq_len:
      raise ValueError(f"segments {self.segments} must cover seq_len={self.seq_len} tokens")

  @property
  def padded_len(self) -> int:
    return cdiv(self.seq_len, self.block) * self.block

  @property
  def num_blocks(self) -> int:
    return self.padded_len // self.block

  def token_index(self) -> tuple[np.ndarray, np.ndarray]:
    """(global flat index, valid) for every kernel position."""
    idx = np.arange(self.padded_len, dtype=np.int64)
    if not self.segments:
      return np.minimum(idx, self.seq_len - 1), idx < self.seq_len
    glob = np.concatenate([np.arange(n, dtype=np.int64) + max(start, 0)
                           for start, n in self.segments])
    valid = np.concatenate([np.full(n, start >= 0) for start, n in self.segments])
    pad = self.padded_len - self.seq_len
    return (np.concatenate([glob, np.full(pad, glob[-1] if len(glob) else 0)]),
            np.concatenate([valid, np.zeros(pad, bool)]))

  @property
  def is_shard(self) -> bool:
    """Whether the tokens are part of a longer sequence (`segments`)."""
    return bool(self.segments)

  def rows(self) -> np.ndarray:
    """The caller's row of every kernel position (-1: padding)."""
    idx = np.arange(self.padded_len, dtype=np.int64)
    return np.where(idx < self.seq_len, idx, -1)

  def to_kernel(self, x):
    """[batch, seq, ...] -> [batch, padded_len, ...] (zero padding)."""
    import jax.numpy as jnp
    pad = self.padded_len - self.seq_len
    if pad == 0:
      return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

  def from_kernel(self, x):
    return x[:, : self.seq_len]


@dataclasses.dataclass(frozen=True)
class TiledLayout:
  """``spatial_shape``: the caller's grid; ``origin``: its first position's coordinates in
  the mask's (global) grid, one per dim (empty: all zero). A context-parallel shard is a
  slab of the global grid: the mask sees global coordinates (`mask_coords`), the kernels
  read the local tensor."""
  spatial_shape: tuple[int, ...]
  dilation: tuple[int, ...]
  tile_shape: tuple[int, ...]
  origin: tuple[int, ...] = ()

  def __post_init__(self):
    if len(self.tile_shape) != len(self.spatial_shape):
      raise ValueError(f"tile shape {self.tile_shape} must have one entry per spatial dimension "
                       f"of {self.spatial_shape}")
    if any(t <= 0 for t in self.tile_shape):
      raise ValueError(f"tile shape entries must be positive, got {self.tile_shape}")

  @property
  def ndim(self) -> int:
    return len(self.spatial_shape)

  @property
  def block(self) -> int:
    return math.prod(self.tile_shape)

  def group_padded(self, dim: int) -> int:
    """Padded length P of each dilation group along `dim` (a multiple of the tile)."""
    length, d, t = self.spatial_shape[dim], self.dilation[dim], self.tile_shape[dim]
    return cdiv(cdiv(length, d), t) * t

  def dim_padded(self, dim: int) -> int:
    return self.dilation[dim] * self.group_padded(dim)

  @property
  def tile_grid(self) -> tuple[int, ...]:
    return tuple(self.dim_padded(i) // self.tile_shape[i] for i in range(self.ndim))

  @property
  def num_blocks(self) -> int:
    return math.prod(self.tile_grid)

  @property
  def padded_len(self) -> int:
    return self.num_blocks * self.block

  @property
  def seq_len(self) -> int:
    return math.prod(self.spatial_shape)

  def dim_coords(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Original coordinate along `dim` of each padded position, and whether it is real."""
    p = np.arange(self.dim_padded(dim), dtype=np.int64)
    big = self.group_padded(dim)
    d = self.dilation[dim]
    x = (p % big) * d + p // big
    valid = x < self.spatial_shape[dim]
    return np.where(valid, x, 0), valid

  def mask_coords(self, dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`dim_coords` in the mask's grid of `length` along `dim`: shifted by the origin and
    clipped into the grid; positions outside it (a halo past the edge) are not valid."""
    x, valid = self.dim_coords(dim)
    x = x + (self.origin[dim] if self.origin else 0)
    return np.clip(x, 0, length - 1), valid & (x >= 0) & (x < length)

  @property
  def is_shard(self) -> bool:
    """Whether the grid is a slab of a larger one (`origin`)."""
    return bool(self.origin)

  def rows(self) -> np.ndarray:
    """The caller's (local, row-major) flat row of every kernel position (-1: padding)."""
    return _valid_rows(self)

  def token_index(self) -> tuple[np.ndarray, np.ndarray]:
    """(original row-major flat index, valid) for every kernel position."""
    per_dim = [self.per_token(self.dim_coords(i)[0], i) for i in range(self.ndim)]
    valid_dim = [self.per_token(self.dim_coords(i)[1], i) for i in range(self.ndim)]
    flat = np.zeros(self.padded_len, np.int64)
    for i, coord in enumerate(per_dim):
      flat = flat * self.spatial_shape[i] + coord
    return flat, np.logical_and.reduce(valid_dim)

  def per_token(self, dim_values: np.ndarray, dim: int) -> np.ndarray:
    """Broadcast a per-padded-position vector along `dim` to every kernel position."""
    t = self.tile_shape[dim]
    grid = self.tile_grid
    vals = dim_values.reshape(grid[dim], t)
    # Kernel order is [tile_0 .. tile_{n-1}, within_0 .. within_{n-1}], row-major.
    shape = [1] * (2 * self.ndim)
    shape[dim], shape[self.ndim + dim] = grid[dim], t
    out = np.broadcast_to(vals.reshape(shape), grid + self.tile_shape)
    return out.reshape(-1)

  def to_kernel(self, x):
    """[batch, *spatial, *rest] -> [batch, padded_len, *rest] in tiled order."""
    import jax.numpy as jnp
    n = self.ndim
    rest = x.shape[1 + n:]
    pads = [(0, 0)] + [(0, self.dim_padded(i) - s) for i, s in enumerate(self.spatial_shape)]
    x = jnp.pad(x, pads + [(0, 0)] * len(rest))
    # Split each padded dim into (group position, dilation group), then into tiles.
    shape = [x.shape[0]]
    for i in range(n):
      shape += [self.group_padded(i), self.dilation[i]]
    x = x.reshape(shape + list(rest))
    # -> (dilation group, group position) per dim.
    perm = [0]
    for i in range(n):
      perm += [2 + 2 * i, 1 + 2 * i]
    perm += list(range(1 + 2 * n, x.ndim))
    x = x.transpose(perm)
    shape = [x.shape[0]]
    for i in range(n):
      shape += [self.tile_grid[i], self.tile_shape[i]]
    x = x.reshape(shape + list(rest))
    perm = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)]
    perm += list(range(1 + 2 * n, x.ndim))
    return x.transpose(perm).reshape((x.shape[0], self.padded_len) + tuple(rest))

  def from_kernel(self, y):
    """Inverse of `to_kernel`: [batch, padded_len, *rest] -> [batch, *spatial, *rest]."""
    n = self.ndim
    rest = y.shape[2:]
    y = y.reshape((y.shape[0],) + self.tile_grid + self.tile_shape + tuple(rest))
    perm = [0]
    for i in range(n):
      perm += [1 + i, 1 + n + i]
    perm += list(range(1 + 2 * n, y.ndim))
    y = y.transpose(perm)
    shape = [y.shape[0]]
    for i in range(n):
      shape += [self.dilation[i], self.group_padded(i)]
    y = y.reshape(shape + list(rest))
    perm = [0]
    for i in range(n):
      perm += [2 + 2 * i, 1 + 2 * i]
    perm += list(range(1 + 2 * n, y.ndim))
    y = y.transpose(perm)
    y = y.reshape((y.shape[0],) + tuple(self.dim_padded(i) for i in range(n)) + tuple(rest))
    return y[(slice(None),) + tuple(slice(0, s) for s in self.spatial_shape)]


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """Several N-D grids packed one after the other (each row-major) into one sequence, every
  grid in its own `TiledLayout` order: kernel order is grid 0's tiles, then grid 1's, ...
  (`masks.PackedNeighborhood`: blocks are spatial tiles of one grid, as for one grid).
  The grids' tiles hold the same number of tokens (``block``)."""
  grids: tuple[TiledLayout, ...]

  def __post_init__(self):
    if len({g.block for g in self.grids}) != 1:
      raise ValueError(f"packed grids need tiles of one size, got "
                       f"{[g.tile_shape for g in self.grids]}")

  @property
  def block(self) -> int:
    return self.grids[0].block

  @property
  def padded_len(self) -> int:
    return sum(g.padded_len for g in self.grids)

  @property
  def num_blocks(self) -> int:
    return self.padded_len // self.block

  @property
  def seq_len(self) -> int:
    return sum(g.seq_len for g in self.grids)

  is_shard = False
  segments = ()

  def _starts(self):
    return np.cumsum([0] + [g.seq_len for g in self.grids])[:-1]

  def token_index(self) -> tuple[np.ndarray, np.ndarray]:
    """(flat index in the packed sequence, valid) for every kernel position."""
    flats, valids = zip(*(g.token_index() for g in self.grids))
    return (np.concatenate([f + s for f, s in zip(flats, self._starts())]),
            np.concatenate(valids))

  def rows(self) -> np.ndarray:
    """The caller's flat row (in the packed sequence) of every kernel position (-1: padding)."""
    return _valid_rows(self)

  def to_kernel(self, x):
    """[batch, seq_len, ...] -> [batch, padded_len, ...] in kernel order."""
    import jax.numpy as jnp
    parts = []
    for g, s in zip(self.grids, self._starts()):
      piece = x[:, int(s):int(s) + g.seq_len]
      parts.append(g.to_kernel(piece.reshape((x.shape[0], *g.spatial_shape, *x.shape[2:]))))
    return jnp.concatenate(parts, axis=1)

  def from_kernel(self, y):
    """Inverse of `to_kernel`."""
    import jax.numpy as jnp
    parts, start = [], 0
    for g in self.grids:
      piece = g.from_kernel(y[:, start:start + g.padded_len])
      parts.append(piece.reshape((y.shape[0], g.seq_len, *y.shape[2:])))
      start += g.padded_len
    return jnp.concatenate(parts, axis=1)
