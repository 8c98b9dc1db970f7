"""Mask specifications: lazy, hashable descriptions of which (query, key) pairs attend.

A mask is evaluated on *flat token indices in the caller's order* (`q_idx`, `kv_idx`,
broadcastable int arrays) and returns a boolean array: ``mask(q_idx, kv_idx)``.

Most masks in this field are *interval masks*: for every query there is, per "mask
dimension", an interval ``[lo, hi]`` and every key has a coordinate ``c``; the pair attends
when ``lo <= c <= hi`` in every dimension. Causal, sliding-window, block-local and every
generalized-neighborhood (GNA) mask have this form, and so does their intersection. Kernels
evaluate interval masks from three small per-token int32 vectors (no integer division in
the kernel, no N x N tensor anywhere), and block maps are derived from per-block minima and
maxima of those vectors. An explicit array whose rows are each one run of keys is one too
(``from_array`` gives `RowBounds`). Masks that are not interval masks (``from_function``,
other arrays, ``|``) are evaluated elementwise.

Nothing in this file knows about Pallas; kernels consume the arrays these objects produce.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import operator
from typing import Any, Callable, Sequence

import numpy as np

Array = Any

# Query rows that must see nothing (padding) get the empty interval [1, 0]; padded keys get
# coordinate -1. Every real lower bound is clamped to >= 0, so -1 never attends.
EMPTY_LO, EMPTY_HI, PAD_COORD = 1, 0, -1


def _xp(*arrays):
  """numpy for numpy inputs (trace-time block maps), jax.numpy otherwise (kernels)."""
  if all(isinstance(a, (np.ndarray, np.generic, int)) for a in arrays):
    return np
  import jax.numpy as jnp
  return jnp


class Mask:
  """Base class. Subclasses are frozen dataclasses (hashable: block maps are cached by them)."""

  def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
    raise NotImplementedError

  # Interval-mask protocol. `num_dims` is None for masks that are not interval masks.
  num_dims: int | None = None

  def q_bounds(self, q_idx: Array) -> tuple[list[Array], list[Array]]:
    raise NotImplementedError(f"{type(self).__name__} is not an interval mask")

  def kv_coords(self, kv_idx: Array) -> list[Array]:
    raise NotImplementedError(f"{type(self).__name__} is not an interval mask")

  @property
  def is_interval(self) -> bool:
    return self.num_dims is not None

  def __and__(self, other: "Mask") -> "Mask":
    _check_mask(other, "other")
    if self.is_interval and other.is_interval:
      return IntervalAnd(_interval_parts(self) + _interval_parts(other))
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    _check_mask(other, "other")
    return Or(self, other)


def _check_mask(mask, name):
  if not isinstance(mask, Mask):
    raise ValueError(f"{name} must be a jax_sparse_attn.masks.Mask, got {type(mask).__name__}")


class IntervalMask(Mask):
  """A mask of the form AND_d lo_d(q) <= c_d(kv) <= hi_d(q)."""

  def __call__(self, q_idx, kv_idx):
    xp = _xp(q_idx, kv_idx)
    los, his = self.q_bounds(q_idx)
    cs = self.kv_coords(kv_idx)
    out = None
    for lo, hi, c in zip(los, his, cs):
      term = (lo <= c) & (c <= hi)
      out = term if out is None else out & term
    return xp.asarray(out)


def _interval_parts(mask: Mask) -> tuple[Mask, ...]:
  return mask.parts if isinstance(mask, IntervalAnd) else (mask,)


@dataclasses.dataclass(frozen=True)
class Full(IntervalMask):
  """Every pair attends (dense attention)."""
  num_dims = 1

  def q_bounds(self, q_idx):
    xp = _xp(q_idx)
    return [xp.zeros_like(q_idx)], [xp.full_like(q_idx, np.iinfo(np.int32).max)]

  def kv_coords(self, kv_idx):
    return [kv_idx]


@dataclasses.dataclass(frozen=True)
class Causal(IntervalMask):
  """Key ``kv`` is visible to query ``q`` when ``kv <= q + offset``.

  ``offset=0`` aligns the first query with the first key (top-left); use
  ``offset=seq_kv - seq_q`` for the bottom-right alignment of decoding with a KV cache.
  """
  offset: int = 0
  num_dims = 1

  def q_bounds(self, q_idx):
    xp = _xp(q_idx)
    return [xp.zeros_like(q_idx)], [q_idx + self.offset]

  def kv_coords(self, kv_idx):
    return [kv_idx]


@dataclasses.dataclass(frozen=True)
class SlidingWindow(IntervalMask):
  """Query ``q`` sees keys ``q - left .. q + right`` (inclusive).

  ``sliding_window(2047)`` is a causal window of 2048 keys (the query itself and 2047 before
  it), the same as ``jax.nn.dot_product_attention(local_window_size=(2047, 0))``.
  """
  left: int
  right: int = 0
  num_dims = 1

  def q_bounds(self, q_idx):
    xp = _xp(q_idx)
    return [xp.maximum(q_idx - self.left, 0)], [q_idx + self.right]

  def kv_coords(self, kv_idx):
    return [kv_idx]


@dataclasses.dataclass(frozen=True)
class BlockLocal(IntervalMask):
  """HaloNet-style local blocks: a query in block ``b = q // block_size`` sees keys of block
  ``b`` plus ``halo`` keys on each side."""
  block_size: int
  halo: int = 0
  num_dims = 1

  def q_bounds(self, q_idx):
    xp = _xp(q_idx)
    start = (q_idx // self.block_size) * self.block_size
    return [xp.maximum(start - self.halo, 0)], [start + self.block_size - 1 + self.halo]

  def kv_coords(self, kv_idx):
    return [kv_idx]


@dataclasses.dataclass(frozen=True)
class IntervalAnd(IntervalMask):
  """Intersection of interval masks: the concatenation of their mask dimensions."""
  parts: tuple[Mask, ...]

  @property
  def num_dims(self):  # type: ignore[override]
    return sum(p.num_dims for p in self.parts)

  def q_bounds(self, q_idx):
    los, his = [], []
    for p in self.parts:
      lo, hi = p.q_bounds(q_idx)
      los += lo
      his += hi
    return los, his

  def kv_coords(self, kv_idx):
    return [c for p in self.parts for c in p.kv_coords(kv_idx)]


@dataclasses.dataclass(frozen=True)
class Sink(IntervalMask):
  """The first ``num_tokens`` keys are visible to every query (attention sinks / global keys).

  Combine with ``|``: ``causal() & (sliding_window(w) | sink(4))`` is StreamingLLM's pattern.
  """
  num_tokens: int
  num_dims = 1

  def q_bounds(self, q_idx):
    xp = _xp(q_idx)
    return [xp.zeros_like(q_idx)], [xp.full_like(q_idx, self.num_tokens - 1)]

  def kv_coords(self, kv_idx):
    return [kv_idx]


# --------------------------------------------------------------------------------------------
# Generalized neighborhood attention (NATTEN semantics), one spatial dimension at a time.


def gna_bounds_1d(x, length: int, kernel: int, stride: int, dilation: int, causal: bool):
  """Interval of visible keys, for queries at coordinates ``x`` along one dimension.

  Returns ``(lo, hi)`` in *encoded* coordinates ``group * length + position_in_group`` (see
  `gna_coord_1d`), so "same dilation group" and "inside the window" are one interval test.
  """
  xp = _xp(x)
  group, pos = x % dilation, x // dilation
  group_len = length // dilation + (group < length % dilation).astype(x.dtype)
  start = (pos // stride) * stride
  if causal:
    leader = xp.minimum(start + stride - 1, group_len - 1)
    lo = xp.maximum(leader - kernel + 1, 0)
    hi = pos
  else:
    leader = xp.minimum(start + stride // 2, group_len - 1)
    lo = xp.clip(leader - kernel // 2, 0, group_len - kernel)
    hi = lo + kernel - 1
  base = group * length
  return base + lo, base + hi


def gna_coord_1d(x, length: int, dilation: int):
  return (x % dilation) * length + x // dilation


def _gna_bounds(mask, coords, lengths):
  """Per-dim (lo, hi) of queries at `coords` in grids of `lengths` (ints or per-token
  arrays) under `mask`'s kernel_size, stride, dilation and is_causal."""
  los, his = [], []
  for x, length, k, s, d, c in zip(coords, lengths, mask.kernel_size, mask.stride,
                                   mask.dilation, mask.is_causal):
    lo, hi = gna_bounds_1d(x, length, k, s, d, c)
    los.append(lo)
    his.append(hi)
  return los, his


def _gna_coords(mask, coords, lengths):
  return [gna_coord_1d(x, length, d) for x, length, d in zip(coords, lengths, mask.dilation)]


def _as_tuple(value, ndim: int, name: str, kind=int) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != ndim:
      raise ValueError(f"{name} must have {ndim} entries (one per spatial dimension), got {value!r}")
    out = tuple(value)
  else:
    out = (value,) * ndim
  for v in out:
    if kind is bool:
      if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool or a tuple of bools, got {value!r}")
    elif isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be an int or a tuple of ints, got {value!r}")
  return tuple(kind(v) for v in out)


@dataclasses.dataclass(frozen=True)
class Neighborhood(IntervalMask):
  """Generalized neighborhood attention over a row-major flattened N-D token grid.

  Per dimension of length L with kernel k, stride s, dilation d: a query attends only within
  its dilation group (``q % d == kv % d``), in group coordinates (``x // d``). Non-causal:
  the leader of the query's stride group is its centre (right of centre for even s), clamped
  to the group; the k-wide window is centred on the leader and shifted inside the group, so
  every query sees exactly k keys per dimension. Causal: the leader is the last query of the
  stride group and keys satisfy ``kv <= q`` and ``kv > leader - k``. N-D is the product.
  """
  spatial_shape: tuple[int, ...]
  kernel_size: tuple[int, ...]
  stride: tuple[int, ...]
  dilation: tuple[int, ...]
  is_causal: tuple[bool, ...]

  @property
  def num_dims(self):  # type: ignore[override]
    return len(self.spatial_shape)

  def _coords(self, flat):
    xp = _xp(flat)
    coords = []
    rest = flat
    for size in reversed(self.spatial_shape):
      coords.append(rest % size)
      rest = rest // size
    return coords[::-1], xp

  def q_bounds(self, q_idx):
    return _gna_bounds(self, self._coords(q_idx)[0], self.spatial_shape)

  def kv_coords(self, kv_idx):
    return _gna_coords(self, self._coords(kv_idx)[0], self.spatial_shape)

  @property
  def num_tokens(self) -> int:
    return math.prod(self.spatial_shape)


@dataclasses.dataclass(frozen=True)
class PackedNeighborhood(IntervalMask):
  """Neighborhood attention inside each of several grids of different shapes, packed one
  after the other (each row-major) into one sequence: NATTEN's semantics (windows shifted at
  each grid's own borders) per grid, nothing across grids.

  An interval mask with one more dimension than the grids: the grid number (a query's
  interval is its own grid, a key's coordinate its grid), so every kernel runs it as it
  runs a neighborhood.
  """
  spatial_shapes: tuple[tuple[int, ...], ...]
  kernel_size: tuple[int, ...]
  stride: tuple[int, ...]
  dilation: tuple[int, ...]
  is_causal: tuple[bool, ...]

  @property
  def num_dims(self):  # type: ignore[override]
    return len(self.kernel_size) + 1

  @property
  def num_tokens(self) -> int:
    return sum(math.prod(s) for s in self.spatial_shapes)

  def _locate(self, flat):
    """(grid number, per-dim coordinates, per-dim grid lengths) of packed positions."""
    xp = _xp(flat)
    sizes = [math.prod(s) for s in self.spatial_shapes]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    grid = flat * 0
    for start in starts[1:]:
      grid = grid + (flat >= int(start)).astype(grid.dtype)
    pick = lambda values: xp.asarray(np.asarray(values, np.int64)).astype(grid.dtype)[grid]
    rest = flat - pick(starts)
    coords, lengths = [], []
    for dim in reversed(range(len(self.kernel_size))):
      length = pick([shape[dim] for shape in self.spatial_shapes])
      coords.append(rest % length)
      lengths.append(length)
      rest = rest // length
    return grid, coords[::-1], lengths[::-1]

  def q_bounds(self, q_idx):
    grid, coords, lengths = self._locate(q_idx)
    los, his = _gna_bounds(self, coords, lengths)
    return [grid] + los, [grid] + his

  def kv_coords(self, kv_idx):
    grid, coords, lengths = self._locate(kv_idx)
    return [grid] + _gna_coords(self, coords, lengths)


# --------------------------------------------------------------------------------------------
# Generic (elementwise) masks.


@dataclasses.dataclass(frozen=True, eq=False)
class FromFunction(Mask):
  """A jnp-traceable ``fn(q_idx, kv_idx) -> bool`` (FlexAttention's ``mask_mod``).

  Hashed by identity of ``fn``: reuse one function object so block maps are cached.
  """
  fn: Callable[[Array, Array], Array]

  def __call__(self, q_idx, kv_idx):
    import jax.numpy as jnp
    xp = _xp(q_idx, kv_idx)
    out = self.fn(q_idx, kv_idx)
    out = np.asarray(out) if xp is np else jnp.asarray(out)
    if out.dtype != np.bool_:
      raise ValueError(f"from_function's fn must return booleans (True: attend), got dtype "
                       f"{out.dtype}; compare, e.g. `(q_idx - kv_idx) < 64`")
    shape = np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx))
    return out if out.shape == shape else xp.broadcast_to(out, shape)


def _host_array(x, name: str) -> np.ndarray:
  """`x` as a NumPy array; a traced value (inside `jit`) is a ValueError naming `name`:
  block maps and kernel vectors are built from it at trace time."""
  try:
    return np.asarray(x)
  except Exception as e:  # jax.errors.TracerArrayConversionError and kin
    raise ValueError(f"{name} must be a concrete host array (NumPy, or a jax array outside "
                     f"jit): the block map is built from it at trace time; for masks that "
                     f"depend on traced values use `from_function`, segment ids or "
                     f"`block_selection`") from e


@dataclasses.dataclass(frozen=True, eq=False)
class FromArray(Mask):
  """An explicit boolean ``[seq_q, seq_kv]`` mask (small problems, tests, odd patterns)."""
  array: Any

  def __post_init__(self):
    arr = _host_array(self.array, "from_array's array")
    if arr.ndim != 2 or arr.dtype != np.bool_:
      raise ValueError(f"from_array expects a 2-D boolean array, got shape {arr.shape} dtype {arr.dtype}")
    object.__setattr__(self, "array", arr)

  @property
  def shape(self) -> tuple[int, int]:
    return self.array.shape

  def __call__(self, q_idx, kv_idx):
    xp = _xp(q_idx, kv_idx)
    sq, skv = self.array.shape
    inside = (q_idx < sq) & (kv_idx < skv)
    arr = xp.asarray(self.array)
    return inside & arr[xp.minimum(q_idx, sq - 1), xp.minimum(kv_idx, skv - 1)]


@dataclasses.dataclass(frozen=True, eq=False)
class RowBounds(IntervalMask):
  """Query ``q`` sees keys ``lo[q] .. hi[q]`` (inclusive; ``lo[q] > hi[q]``: none) of
  ``seq_kv``: one run of keys per query, from two int vectors of length seq_q (O(N) memory).
  `from_array` gives this form for an array whose rows are each one run of keys (or empty),
  so such arrays run on every kernel backend as interval masks. Equal (and hashed) by value."""
  lo: Any
  hi: Any
  seq_kv: int

  num_dims = 1

  def __post_init__(self):
    lo, hi = _host_array(self.lo, "row bounds lo"), _host_array(self.hi, "row bounds hi")
    if (lo.ndim != 1 or lo.shape != hi.shape or not np.issubdtype(lo.dtype, np.integer)
        or not np.issubdtype(hi.dtype, np.integer) or lo.size == 0):
      raise ValueError(f"row bounds lo and hi must be non-empty 1-D integer arrays of one "
                       f"length (seq_q), got {lo.shape} {lo.dtype} and {hi.shape} {hi.dtype}")
    if not isinstance(self.seq_kv, (int, np.integer)) or self.seq_kv < 1:
      raise ValueError(f"seq_kv must be a positive int, got {self.seq_kv!r}")
    lo, hi = np.maximum(lo, 0), np.minimum(hi, int(self.seq_kv) - 1)
    empty = lo > hi
    lo = np.where(empty, EMPTY_LO, lo).astype(np.int32)
    hi = np.where(empty, EMPTY_HI, hi).astype(np.int32)
    object.__setattr__(self, "lo", lo)
    object.__setattr__(self, "hi", hi)
    object.__setattr__(self, "seq_kv", int(self.seq_kv))
    digest = hashlib.sha1(lo.tobytes() + hi.tobytes()).hexdigest()
    object.__setattr__(self, "_key", (digest, lo.size, self.seq_kv))

  def __eq__(self, other):
    return isinstance(other, RowBounds) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    return f"RowBounds(seq_q={self.lo.size}, seq_kv={self.seq_kv})"

  @property
  def shape(self) -> tuple[int, int]:
    return (self.lo.size, self.seq_kv)

  def q_bounds(self, q_idx):
    xp = _xp(q_idx)
    n = self.lo.size
    row = xp.clip(q_idx, 0, n - 1)
    inside = (q_idx >= 0) & (q_idx < n)
    return ([xp.where(inside, xp.asarray(self.lo)[row], EMPTY_LO)],
            [xp.where(inside, xp.asarray(self.hi)[row], EMPTY_HI)])

  def kv_coords(self, kv_idx):
    return [kv_idx]


def run_bounds(array: np.ndarray, max_runs: int):
  """Per run index r < the most runs of True in any row of a boolean [seq_q, seq_kv] array,
  ``(lo, hi)``: each row's r-th run (rows with fewer runs: lo > hi); None where some row
  has more than `max_runs` runs."""
  edges = np.diff(array.astype(np.int8), axis=1, prepend=0, append=0)
  rows_s, starts = np.nonzero(edges == 1)  # row-major: each row's runs in order
  ends = np.nonzero(edges == -1)[1] - 1
  counts = np.bincount(rows_s, minlength=array.shape[0])
  runs = int(counts.max(initial=0))
  if runs > max_runs:
    return None
  rank = np.arange(rows_s.size) - np.repeat(np.cumsum(counts) - counts, counts)
  out = []
  for r in range(max(runs, 1)):
    lo = np.full(array.shape[0], EMPTY_LO, np.int64)
    hi = np.full(array.shape[0], EMPTY_HI, np.int64)
    pick = rank == r
    lo[rows_s[pick]], hi[rows_s[pick]] = starts[pick], ends[pick]
    out.append((lo, hi))
  return out


def array_terms(mask: Mask, elementwise: bool = False):
  """``(term, elementwise)`` for each explicit array term of `mask` (`FromArray`,
  `RowBounds`: `from_array`, `from_row_bounds`); ``elementwise``: the term sits inside
  ``|`` or beside a non-interval mask, where it is evaluated element by element."""
  if isinstance(mask, (FromArray, RowBounds)):
    yield mask, elementwise
  elif isinstance(mask, IntervalAnd):
    for part in mask.parts:
      yield from array_terms(part, elementwise)
  elif isinstance(mask, (And, Or)):
    yield from array_terms(mask.a, True)
    yield from array_terms(mask.b, True)


def _run_map(x, runs):
  """Global index of local position x for runs ((global_start, length), ...) in order
  (positions in a run with global_start -1, or past the runs, map to 0: padding)."""
  xp = _xp(x)
  out, start = x * 0, 0
  for first, length in runs:
    if first >= 0:
      out = xp.where((x >= start) & (x < start + length), x - start + first, out)
    start += length
  return out


@dataclasses.dataclass(frozen=True)
class Remapped(Mask):
  """``mask`` (on global token indices) evaluated on local positions of a shard whose tokens
  are the runs ``((global_start, length), ...)`` of the global sequence
  (`layout.SequenceLayout.segments`): what kernels evaluate for elementwise masks on a
  context-parallel shard."""
  mask: Mask
  q_runs: tuple
  kv_runs: tuple

  def __call__(self, q_idx, kv_idx):
    return self.mask(_run_map(q_idx, self.q_runs), _run_map(kv_idx, self.kv_runs))


@dataclasses.dataclass(frozen=True)
class And(Mask):
  a: Mask
  b: Mask

  def __call__(self, q_idx, kv_idx):
    return self.a(q_idx, kv_idx) & self.b(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  a: Mask
  b: Mask

  def __call__(self, q_idx, kv_idx):
    return self.a(q_idx, kv_idx) | self.b(q_idx, kv_idx)


# --------------------------------------------------------------------------------------------
# Public constructors.


def _check_nonneg_int(value, name):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def full() -> Mask:
  return Full()


def causal(offset: int = 0) -> Mask:
  if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
    raise ValueError(f"offset must be an int, got {offset!r}")
  return Causal(int(offset))


def sliding_window(left: int, right: int = 0) -> Mask:
  _check_nonneg_int(left, "left")
  _check_nonneg_int(right, "right")
  return SlidingWindow(int(left), int(right))


def block_local(block_size: int, halo: int = 0) -> Mask:
  _check_nonneg_int(block_size, "block_size")
  if block_size == 0:
    raise ValueError("block_size must be positive, got 0")
  _check_nonneg_int(halo, "halo")
  return BlockLocal(int(block_size), int(halo))


def neighborhood(spatial_shape: Sequence[int], kernel_size, stride=1, dilation=1,
                 is_causal=False) -> Neighborhood:
  """GNA mask over a row-major flattened grid of ``spatial_shape`` (see `Neighborhood`)."""
  if isinstance(spatial_shape, int):
    spatial_shape = (spatial_shape,)
  spatial_shape = tuple(int(s) for s in spatial_shape)
  ndim = len(spatial_shape)
  if ndim not in (1, 2, 3):
    raise ValueError(f"spatial_shape must have 1, 2 or 3 dimensions, got {spatial_shape}")
  kernel_size = _as_tuple(kernel_size, ndim, "kernel_size")
  stride = _as_tuple(stride, ndim, "stride")
  dilation = _as_tuple(dilation, ndim, "dilation")
  is_causal = _as_tuple(is_causal, ndim, "is_causal", kind=bool)
  for name, vals in (("spatial_shape", spatial_shape), ("kernel_size", kernel_size),
                     ("stride", stride), ("dilation", dilation)):
    if any(v <= 0 for v in vals):
      raise ValueError(f"{name} must be positive, got {vals}")
  for i, (length, k, s, d) in enumerate(zip(spatial_shape, kernel_size, stride, dilation)):
    if k * d > length:
      raise ValueError(
          f"kernel_size * dilation must not exceed the input size in every dimension: dimension "
          f"{i} has kernel_size={k}, dilation={d} but size {length}")
    if s > k:
      raise ValueError(f"stride must not exceed kernel_size: dimension {i} has stride={s} > "
                       f"kernel_size={k}")
  return Neighborhood(spatial_shape, kernel_size, stride, dilation, is_causal)


def packed_neighborhood(spatial_shapes: Sequence[Sequence[int]], kernel_size, stride=1,
                        dilation=1, is_causal=False) -> PackedNeighborhood:
  """GNA inside each grid of ``spatial_shapes`` (all of one rank, 1-3), packed row-major one
  after the other into one sequence of ``sum(prod(shape))`` tokens (see
  `PackedNeighborhood`). kernel_size etc. as in `neighborhood`, shared by every grid, and
  must fit the smallest."""
  if (not isinstance(spatial_shapes, (list, tuple)) or not spatial_shapes
      or not all(isinstance(t, (list, tuple)) for t in spatial_shapes)):
    raise ValueError(f"spatial_shapes must be a non-empty sequence of shapes (tuples), got "
                     f"{spatial_shapes!r}")
  ranks = {len(t) for t in spatial_shapes}
  if len(ranks) != 1:
    raise ValueError(f"spatial_shapes must all have the same rank, got {spatial_shapes!r}")
  for i, shape in enumerate(spatial_shapes):
    try:
      one = neighborhood(shape, kernel_size, stride, dilation, is_causal)
    except ValueError as e:
      raise ValueError(f"spatial_shapes[{i}] = {tuple(shape)}: {e}") from None
  return PackedNeighborhood(tuple(tuple(int(x) for x in t) for t in spatial_shapes),
                            one.kernel_size, one.stride, one.dilation, one.is_causal)


def sink(num_tokens: int) -> Mask:
  _check_nonneg_int(num_tokens, "num_tokens")
  return Sink(int(num_tokens))


def from_function(fn: Callable[[Array, Array], Array]) -> Mask:
  if not callable(fn):
    raise ValueError(f"fn must be callable, got {type(fn).__name__}")
  return FromFunction(fn)


def from_array(array) -> Mask:
  """An explicit boolean ``[seq_q, seq_kv]`` mask. Where every row is one run of keys (or
  none: causal, windows, prefix-LM, block-diagonal documents, chunked attention) it becomes
  `RowBounds` (an interval mask: O(N) vectors, every backend, blocks skipped); where rows
  have up to `MAX_TERMS` runs (a window with sinks or global tokens), the union of one
  `RowBounds` per run (every kernel backend tests it as intervals per term, sharded too);
  otherwise it stays an array evaluated elementwise on `xla`."""
  mask = FromArray(array)
  runs = run_bounds(mask.array, MAX_TERMS)
  if runs is None:
    return mask
  terms = [RowBounds(lo, hi, mask.array.shape[1]) for lo, hi in runs]
  return functools.reduce(operator.or_, terms)


def from_row_bounds(lo, hi, seq_kv: int) -> Mask:
  """Query ``q`` sees keys ``lo[q] .. hi[q]`` (inclusive; ``lo[q] > hi[q]``: none):
  ``lo``, ``hi`` integer vectors of length seq_q (NumPy, host values), ``seq_kv`` the key
  length. An interval mask: every backend."""
  return RowBounds(lo, hi, seq_kv)


# A union of at most this many interval terms runs as intervals on the Hopper kernels
# (`interval_terms`); more, and the mask runs elementwise.
MAX_TERMS = 4


def interval_terms(mask: Mask, max_terms: int = MAX_TERMS) -> tuple[Mask, ...] | None:
  """``mask`` as a union of interval masks (its disjunctive form: ``&`` distributes over
  ``|``), or None where it has no such form of at most ``max_terms`` terms (a mask function,
  an array, too many terms). ``causal() & (sliding_window(w) | sink(4))`` is the two terms
  ``causal & window`` and ``causal & sink``; an interval mask is its own one term."""
  if mask.is_interval:
    return (mask,)
  if isinstance(mask, (And, Or)):
    a, b = interval_terms(mask.a, max_terms), interval_terms(mask.b, max_terms)
    if a is None or b is None:
      return None
    terms = a + b if isinstance(mask, Or) else tuple(x & y for x in a for y in b)
    return terms if len(terms) <= max_terms else None
  return None


def union_intervals(terms: Sequence[Mask], q_idx: np.ndarray, kv_idx: np.ndarray,
                    q_valid: np.ndarray, kv_valid: np.ndarray):
  """Per-token vectors of a union of interval masks (`interval_terms`): ``lo, hi [T * D,
  n_q]`` and ``c [T * D, n_kv]``, term t's dims at rows ``t * D .. t * D + D - 1``; a pair
  attends when every dim of some term holds. Within a term, dims on the same key coordinate
  merge into one (``causal & window``: lo the larger, hi the smaller bound); a term with fewer
  than D dims repeats its first. Padding as `per_token_intervals` (in every term)."""
  parts = []
  for term in terms:
    lo, hi, c = per_token_intervals(term, q_idx, kv_idx, q_valid, kv_valid)
    merged: list[list] = []
    for d in range(len(c)):
      same = next((m for m in merged if np.array_equal(m[2], c[d])), None)
      if same is None:
        merged.append([lo[d], hi[d], c[d]])
      else:
        same[0], same[1] = np.maximum(same[0], lo[d]), np.minimum(same[1], hi[d])
    parts.append(merged)
  dims = max(len(m) for m in parts)
  rows = [m[d if d < len(m) else 0] for m in parts for d in range(dims)]
  return tuple(np.stack([r[i] for r in rows]).astype(np.int32) for i in range(3))


def per_token_intervals(mask: Mask, q_idx: np.ndarray, kv_idx: np.ndarray,
                        q_valid: np.ndarray, kv_valid: np.ndarray):
  """Evaluate an interval mask's per-token vectors, with padding folded in.

  Returns int32 arrays ``lo, hi: [num_dims, len(q_idx)]`` and ``c: [num_dims, len(kv_idx)]``.
  Padded queries get the empty interval, padded keys coordinate -1.
  """
  los, his = mask.q_bounds(q_idx)
  cs = mask.kv_coords(kv_idx)
  lo = np.stack([np.broadcast_to(x, q_idx.shape) for x in los]).astype(np.int64)
  hi = np.stack([np.broadcast_to(x, q_idx.shape) for x in his]).astype(np.int64)
  c = np.stack([np.broadcast_to(x, kv_idx.shape) for x in cs]).astype(np.int64)
  lo = np.where(q_valid[None], lo, EMPTY_LO)
  hi = np.where(q_valid[None], hi, EMPTY_HI)
  c = np.where(kv_valid[None], c, PAD_COORD)
  big = np.iinfo(np.int32).max
  return (np.clip(lo, 0, big).astype(np.int32), np.clip(hi, -1, big).astype(np.int32),
          np.clip(c, PAD_COORD, big).astype(np.int32))
