"""Context parallelism: attention whose sequence (or leading spatial dim) is sharded over a
mesh axis, built from JAX's own machinery (`jax.shard_map`, `lax.ppermute`, `lax.all_gather`).

Each device holds one shard of Q, K and V along the context axis; the output keeps Q's
sharding. Three strategies move K/V:

* **halo**: masks whose keys lie within a bounded reach of their queries (sliding windows,
  block-local, neighborhoods in 1-3 D with stride, dilation and causal dims). Each device
  receives from its neighbours only the K/V rows its queries reach (`ppermute`, several hops
  when the reach spans several shards), then runs one local kernel. Bytes per device do not
  depend on the sequence length.
* **ring**: any mask. K/V shards travel around the ring (`ppermute`, the send of the next
  step overlapping the kernel of this one); each step's partial attention is merged by
  log-sum-exp (`merge_attentions`). Steps after the last one any device needs are not run and
  their K/V is not sent (a causal window needs one step, not N - 1). Causal load balance:
  ``context_layout="zigzag"`` (device i holds chunks i and 2N-1-i; `to_zigzag`).
* **allgather**: every device gathers all K/V (as MaxText and Llama 3 do) and runs one
  kernel: cheapest for short sequences or few KV heads.

Everything is decided on the host at trace time by `plan_context`: from the mask and the
shard ranges it builds one plan per (Q shard, KV shard) pair whose layouts carry the global
token indices (`SequenceLayout.segments`, `TiledLayout.origin`), drops empty pairs, and merges
plans that are the same relation after relabelling coordinates (`_canonical`), so a causal
ring compiles three kernels for any shard count. Devices pick their plan with `lax.switch`
on `lax.axis_index`. Gradients are JAX's autodiff through `shard_map`: a ppermute transposes
to the reverse ppermute, so dK/dV travel back along the ring with their shard; all_gather
transposes to a reduce-scatter.

`strategy="auto"` takes the cheapest by `estimate` (bytes over link bandwidth against the
per-device block work from the plans; see `Hardware`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from . import masks as masks_lib
from . import plan as plan_lib
from .layout import SequenceLayout, TiledLayout
from .merge import merge_attentions
from .plan import AttentionPlan

STRATEGIES = ("auto", "ring", "halo", "allgather")
CONTEXT_LAYOUTS = ("contiguous", "zigzag")
# Mesh axes that `attention`/`na` shard batch and heads over when a mesh is present (the
# names `nn.DEFAULT_RULES` maps "batch" and "heads" to, and common aliases).
BATCH_AXES = ("data", "fsdp", "batch")
HEAD_AXES = ("model", "tensor", "heads")


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Rates of `estimate`'s cost model. Defaults for the H200: the link rate is assumed
  (NVLink, 450 GB/s per direction on paper; not measured yet), the kernel rate and collective
  cost are round figures below the measured 614 TFLOP/s causal forward (docs/performance.md)."""
  link_bytes_per_s: float = 3.5e11  # one direction, device to device
  flops_per_s: float = 5.5e14  # sustained block-sparse kernel rate
  collective_s: float = 2.0e-5  # fixed cost of one collective step


# --------------------------------------------------------------------------------------------
# Mesh resolution and partition specs.


def resolve_mesh(mesh, context_axis: str | None):
  """The mesh an op shards over: `mesh`, else the one set with `jax.set_mesh`; None when
  there is none, inside `shard_map` (the op then runs on local shards), or the mesh has one
  device."""
  if isinstance(mesh, str) and mesh == "local":  # ops._LOCAL: inside the op's shard_map
    return None
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.manual_axes:
      mesh = None
  elif not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if mesh is None:
    return None
  if context_axis is not None and context_axis not in mesh.axis_names:
    raise ValueError(f"context_axis {context_axis!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}")
  return mesh if math.prod(mesh.shape.values()) > 1 else None


def _dividing_axes(mesh, names, sizes) -> tuple[str, ...]:
  out, prod = [], 1
  for axis in mesh.axis_names:
    n = mesh.shape[axis]
    if axis in names and n > 1 and all(s % (prod * n) == 0 for s in sizes):
      out.append(axis)
      prod *= n
  return tuple(out)


def _entry(axes):
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def check_options(strategy: str, context_layout: str):
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if context_layout not in CONTEXT_LAYOUTS:
    raise ValueError(f"context_layout must be one of {CONTEXT_LAYOUTS}, got {context_layout!r}")


# --------------------------------------------------------------------------------------------
# Host-side planning.


def _canonical(lo, hi, c):
  """The interval vectors with key coordinates replaced by their rank among the keys'
  coordinates (per mask dim), and query bounds by the ranks they fall between. Every test
  ``lo <= c <= hi`` keeps its result, so two plans with equal canonical vectors (and
  layouts of one geometry) are one kernel problem."""
  out = [], [], []
  for d in range(c.shape[0]):
    valid = c[d] >= 0
    keys = np.unique(c[d][valid])
    out[0].append(np.searchsorted(keys, lo[d], "left"))
    out[1].append(np.searchsorted(keys, hi[d], "right") - 1)
    out[2].append(np.where(valid, np.searchsorted(keys, c[d]), masks_lib.PAD_COORD))
  return tuple(np.stack(x).astype(np.int32) for x in out)


def _geometry(layout):
  if isinstance(layout, SequenceLayout):
    return ("seq", layout.seq_len, layout.block)
  return ("tiled", layout.spatial_shape, layout.dilation, layout.tile_shape)


class _Plans:
  """Unique local plans; `add` returns a plan's index, or -1 when it visits no block."""

  def __init__(self, mask):
    self.mask, self.plans, self._index = mask, [], {}

  def add(self, q_layout, kv_layout) -> int:
    vectors = plan_lib.interval_vectors(self.mask, q_layout, kv_layout)
    key = None
    if vectors is not None:
      canon = _canonical(*vectors)
      key = (_geometry(q_layout), _geometry(kv_layout)) + tuple(
          (a.shape, a.tobytes()) for a in canon)
      if key in self._index:
        return self._index[key]
    plan = plan_lib.make_plan(self.mask, q_layout, kv_layout)
    index = -1
    if int(np.sum(plan.block_map.kv_counts)):
      if vectors is not None:
        # Shards share the plan by its canonical vectors: the union's (merged dims, in the
        # first shard's coordinates) would not carry over.
        plan = dataclasses.replace(plan, q_lo=canon[0], q_hi=canon[1], kv_c=canon[2],
                                   union=None)
      self.plans.append(plan)
      index = len(self.plans) - 1
    if key is not None:
      self._index[key] = index
    return index


@dataclasses.dataclass(frozen=True, eq=False)
class ContextPlan:
  """What each device runs (`plan_context`).

  plans: the unique local plans; table [steps, num_shards] int32: the plan index device s
  runs at step t (-1: nothing to compute). Ring: step t is the K/V shard t hops back;
  halo: the steps are the device's own K/V, then the left and the right halo (rows
  ``halo[0]`` and ``halo[1]`` > 0 only); allgather: one step. halo: (left, right) rows (1-D)
  or leading-dim slices (N-D) received from each side; bytes_per_device: K/V (and segment
  id) bytes each device receives; estimates: seconds per candidate strategy (`estimate`).
  """
  strategy: str
  num_shards: int
  plans: tuple[AttentionPlan, ...]
  table: np.ndarray
  halo: tuple[int, int]
  bytes_per_device: int
  estimates: dict

  @property
  def steps(self) -> int:
    return self.table.shape[0]

  @property
  def sends(self) -> int:
    """Collective-permutes per K/V array: ring steps after the first, or halo hops."""
    if self.strategy == "ring":
      return self.steps - 1
    if self.strategy == "halo":
      extent = self.plans[0].kv_layout if self.plans else None
      size = (extent.seq_len if isinstance(extent, SequenceLayout)
              else extent.spatial_shape[0]) if extent else 1
      return sum(-(-h // size) for h in self.halo)
    return 0


def _seq_shards(seq: int, n: int, layout: str) -> list[tuple[tuple[int, int], ...]]:
  """Global (start, length) runs of each shard's tokens."""
  if layout == "contiguous":
    c = seq // n
    return [((s * c, c),) for s in range(n)]
  c = seq // (2 * n)
  return [((s * c, c), ((2 * n - 1 - s) * c, c)) for s in range(n)]


def _halo_runs(start: int, left: int, length: int, right: int, total: int):
  """Runs of a shard extended by halos: rows outside [0, total) are invalid (-1)."""
  lo, hi = start - left, start + length + right
  runs = []
  if lo < 0:
    runs.append((-1, min(-lo, hi - lo)))
  a, b = max(lo, 0), min(hi, total)
  if b > a:
    runs.append((a, b - a))
  if hi > total:
    runs.append((-1, hi - max(lo, total)))
  return tuple(runs)


def _reach_1d(mask, seq_q: int, seq_kv: int, q_runs, kv_runs):
  """(left, right) halo rows each shard needs beyond its own contiguous KV range, or None
  when the mask's reach is not an interval of key indices (not an interval mask, or key
  coordinates that are not monotone in the key index)."""
  if not mask.is_interval:
    return None
  q_idx, kv_idx = np.arange(seq_q), np.arange(seq_kv)
  lo, hi, c = masks_lib.per_token_intervals(mask, q_idx, kv_idx, np.ones(seq_q, bool),
                                            np.ones(seq_kv, bool))
  if any(np.any(np.diff(c[d].astype(np.int64)) < 0) for d in range(c.shape[0])):
    return None
  left = right = 0
  for (qs, qn), (ks, kn) in zip((r[0] for r in q_runs), (r[0] for r in kv_runs)):
    first, last = 0, seq_kv - 1
    for d in range(c.shape[0]):
      first = max(first, int(np.searchsorted(c[d], lo[d, qs:qs + qn].min(), "left")))
      last = min(last, int(np.searchsorted(c[d], hi[d, qs:qs + qn].max(), "right")) - 1)
    if first <= last:
      left, right = max(left, ks - first), max(right, last - (ks + kn - 1))
  return left, right


def _reach_nd(mask: masks_lib.Neighborhood, n: int):
  """(left, right) leading-dim slices each slab of the leading spatial dim needs."""
  length = mask.spatial_shape[0]
  size = length // n
  x = np.arange(length)
  lo, hi = masks_lib.gna_bounds_1d(x, length, mask.kernel_size[0], mask.stride[0],
                                   mask.dilation[0], mask.is_causal[0])
  raw = lambda enc: enc // length + (enc % length) * mask.dilation[0]  # group + pos * d
  lo_raw, hi_raw = raw(lo), raw(hi)
  left = max(s * size - lo_raw[s * size:(s + 1) * size].min() for s in range(n))
  right = max(hi_raw[s * size:(s + 1) * size].max() - ((s + 1) * size - 1) for s in range(n))
  return max(int(left), 0), max(int(right), 0)


def _block_flops(plan: AttentionPlan, head_dim: int) -> float:
  return 4.0 * float(np.sum(plan.block_map.kv_counts)) * plan.block_q * plan.block_kv * head_dim


def estimate(strategy: str, work: np.ndarray, kv_shard_bytes: float, sends: int,
             halo_bytes: float, hw: Hardware) -> float:
  """Seconds per forward call on one device (the slowest), by strategy.

  work [steps, shards]: FLOPs of each device's kernel at each ring step (the same blocks
  in every strategy; allgather runs their sum). Ring: a step costs the larger of its slowest
  kernel and the send of the next K/V shard (they overlap). Allgather: the gather, then the
  kernel. Halo (work rows: own K/V, then the halos): the larger of the own-K/V kernel and
  the exchange (`halo_bytes`, `sends` hops of the longer side), then the halo kernels.
  """
  kernel = work.sum(axis=0).max() / hw.flops_per_s
  per_step = work.max(axis=1) / hw.flops_per_s
  if strategy == "ring":
    steps = work.shape[0]
    send = kv_shard_bytes / hw.link_bytes_per_s + hw.collective_s
    return float(sum(max(per_step[t], send if t + 1 < steps else 0.0) for t in range(steps)))
  if strategy == "allgather":
    return float((sends * kv_shard_bytes) / hw.link_bytes_per_s + hw.collective_s + kernel)
  # Halo: work rows are (own K/V, halos); the exchange overlaps the own-K/V kernel.
  exchange = halo_bytes / hw.link_bytes_per_s + sends * hw.collective_s
  return float(max(per_step[0], exchange) + work[1:].sum(axis=0).max() / hw.flops_per_s)


@functools.lru_cache(maxsize=64)
def plan_context(mask: masks_lib.Mask, seq_q: int, seq_kv: int, num_shards: int,
                 block_q: int, block_kv: int, strategy: str = "auto",
                 context_layout: str = "contiguous", kv_row_bytes: int = 0,
                 head_dim: int = 128, batch_heads: int = 1,
                 hardware: Hardware = Hardware()) -> ContextPlan:
  """Plan sequence attention sharded `num_shards` ways along the sequence.

  kv_row_bytes: bytes of one K/V token on one device (2 * kv_heads * head_dim * itemsize,
  times the local batch), for the cost model; batch_heads: local batch * heads.
  """
  n = num_shards
  check_options(strategy, context_layout)
  div = n if context_layout == "contiguous" else 2 * n
  for name, s in (("seq_q", seq_q), ("seq_kv", seq_kv)):
    if s % div:
      raise ValueError(f"{name}={s} must be divisible by {div} (the context axis size"
                       f"{' x 2 for the zigzag layout' if div != n else ''})")
  cq, ckv = seq_q // n, seq_kv // n
  q_runs = _seq_shards(seq_q, n, context_layout)
  kv_runs = _seq_shards(seq_kv, n, context_layout)
  q_layouts = [SequenceLayout(cq, block_q, r) for r in q_runs]
  kv_layouts = [SequenceLayout(ckv, block_kv, r) for r in kv_runs]
  plans = _Plans(mask)
  flops = lambda i: _block_flops(plans.plans[i], head_dim) * batch_heads if i >= 0 else 0.0
  work = lambda table: np.vectorize(flops, otypes=[float])(table)
  shard_bytes = ckv * kv_row_bytes
  estimates = {}
  if strategy in ("auto", "ring"):  # (the ring's pairs are also the estimates' work)
    ring = np.array([[plans.add(q_layouts[s], kv_layouts[(s - t) % n]) for s in range(n)]
                     for t in range(n)], np.int32)
    used = np.nonzero((ring >= 0).any(axis=1))[0]
    ring = ring[: int(used[-1]) + 1 if len(used) else 1]
    estimates["ring"] = estimate("ring", work(ring), shard_bytes, ring.shape[0] - 1, 0, hardware)
    estimates["allgather"] = estimate("allgather", work(ring), shard_bytes, n - 1, 0, hardware)
  reach = None
  if strategy in ("auto", "halo") and context_layout == "contiguous":
    reach = _reach_1d(mask, seq_q, seq_kv, q_runs, kv_runs)
  bounded = reach is not None and sum(reach) < (n - 1) * ckv
  if bounded:
    left, right = reach
    # Own K/V (ring step 0), then each side's halo rows.
    starts = (lambda s: s * ckv - left, lambda s: (s + 1) * ckv)
    halo = np.array([[plans.add(q_layouts[s], kv_layouts[s]) for s in range(n)]] + [
        [plans.add(q_layouts[s], SequenceLayout(
            rows, block_kv, _halo_runs(start(s), 0, rows, 0, seq_kv))) for s in range(n)]
        for start, rows in zip(starts, reach) if rows], np.int32)
    # Left and right halos travel concurrently: the longer chain of hops counts.
    hops = max(-(-h // ckv) for h in reach)
    estimates["halo"] = estimate("halo", work(halo), shard_bytes, hops, sum(reach) * kv_row_bytes,
                                 hardware)
  elif strategy == "halo":
    raise ValueError(
        "strategy='halo' needs a mask whose keys lie within a bounded reach of their queries "
        "(sliding_window, block_local, neighborhood and their '&'; context_layout="
        f"'contiguous'); this one {'reaches ' + str(reach) + ' rows' if reach else 'does not'}"
        " — every other shard's keys: use 'ring' or 'allgather'")
  if strategy == "auto":
    strategy = min(estimates, key=lambda k: (estimates[k], ("halo", "ring", "allgather").index(k)))
  if strategy == "ring":
    return ContextPlan("ring", n, tuple(plans.plans), ring, (0, 0),
                       (ring.shape[0] - 1) * shard_bytes, estimates)
  if strategy == "allgather":
    every = SequenceLayout(seq_kv, block_kv, tuple(r for runs in kv_runs for r in runs))
    gather = _Plans(mask)
    table = np.array([[gather.add(q_layouts[s], every) for s in range(n)]], np.int32)
    return ContextPlan("allgather", n, tuple(gather.plans), table, (0, 0),
                       (n - 1) * shard_bytes, estimates)
  return ContextPlan("halo", n, tuple(plans.plans), halo, reach, sum(reach) * kv_row_bytes,
                     estimates)


def _fit_tile(tile: tuple[int, ...], extent: int) -> tuple[int, ...]:
  """A tile no taller than a slab's leading extent (same size: the last dim grows)."""
  tile = list(tile)
  while len(tile) > 1 and tile[0] > 1 and tile[0] >= 2 * extent:
    tile[0] //= 2
    tile[-1] *= 2
  return tuple(tile)


@functools.lru_cache(maxsize=64)
def plan_context_nd(mask: masks_lib.Neighborhood, num_shards: int, q_tile: tuple[int, ...],
                    kv_tile: tuple[int, ...], strategy: str = "auto",
                    kv_row_bytes: int = 0) -> ContextPlan:
  """Plan neighborhood attention sharded along the leading spatial dim (kv_row_bytes: bytes
  of one leading-dim slice of K/V on one device)."""
  n = num_shards
  check_options(strategy, "contiguous")
  if strategy == "ring":
    raise ValueError("strategy='ring' is for 1-D sequences; neighborhoods use 'halo' (or "
                     "'allgather')")
  length = mask.spatial_shape[0]
  if length % n:
    raise ValueError(f"the leading spatial dim ({length}) must be divisible by the context "
                     f"axis size ({n})")
  size = length // n
  rest = mask.spatial_shape[1:]
  q_tile, kv_tile = _fit_tile(q_tile, size), _fit_tile(kv_tile, size)
  zeros = (0,) * len(rest)
  q_layouts = [TiledLayout((size,) + rest, mask.dilation, q_tile, (s * size,) + zeros)
               for s in range(n)]
  left, right = _reach_nd(mask, n)
  bounded = left + right < (n - 1) * size
  if strategy == "halo" and not bounded:
    raise ValueError(f"strategy='halo': the neighborhood reaches {left} + {right} slices of "
                     f"the leading dim beyond a shard of {size}, every other shard's: use "
                     "'allgather'")
  plans = _Plans(mask)
  if strategy == "allgather" or not bounded:
    every = TiledLayout(mask.spatial_shape, mask.dilation, kv_tile, (0,) * (len(rest) + 1))
    table = np.array([[plans.add(q_layouts[s], every) for s in range(n)]], np.int32)
    return ContextPlan("allgather", n, tuple(plans.plans), table, (0, 0),
                       (n - 1) * size * kv_row_bytes, {})
  slab = lambda start, rows: TiledLayout((rows,) + rest, mask.dilation, kv_tile,
                                         (start,) + zeros)
  # Own K/V, then each side's halo slices.
  table = np.array([[plans.add(q_layouts[s], slab(s * size, size)) for s in range(n)]] + [
      [plans.add(q_layouts[s], slab(s * size - left if side == 0 else (s + 1) * size, rows))
       for s in range(n)] for side, rows in enumerate((left, right)) if rows], np.int32)
  return ContextPlan("halo", n, tuple(plans.plans), table, (left, right),
                     (left + right) * kv_row_bytes, {})


# --------------------------------------------------------------------------------------------
# Device-side pieces (inside shard_map).


def _halos(x, axis_name: str, n: int, left: int, right: int, axis: int = 1):
  """The `left` rows (along `axis`) before this shard and the `right` rows after it, from
  the neighbouring shards (several hops when a halo is longer than a shard; zeros past the
  ends of the sequence, which the plans mask). Returns the non-empty ones, left first."""
  if x is None:
    return [None] * ((left > 0) + (right > 0))
  size = x.shape[axis]
  out = []
  if left:
    parts = []
    for m in range(-(-left // size), 0, -1):  # farthest shard first
      rows = min(size, left - (m - 1) * size)
      piece = lax.slice_in_dim(x, size - rows, size, axis=axis)
      parts.append(lax.ppermute(piece, axis_name, [(j, j + m) for j in range(n - m)]))
    out.append(jnp.concatenate(parts, axis=axis))
  if right:
    parts = []
    for m in range(1, -(-right // size) + 1):
      rows = min(size, right - (m - 1) * size)
      piece = lax.slice_in_dim(x, 0, rows, axis=axis)
      parts.append(lax.ppermute(piece, axis_name, [(j, j - m) for j in range(m, n)]))
    out.append(jnp.concatenate(parts, axis=axis))
  return out


def _gather(x, axis_name: str):
  """All of the context axis' shards of x (tokens on axis 1) in shard order; None stays."""
  return None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)


def _merge_steps(cp: ContextPlan, shard, run, q, kv_steps, *extra):
  """Run step t of `cp.table` on the t-th K/V (a tuple of arrays) and merge the partial
  attentions by log-sum-exp (float32), returning (out in q's dtype, lse)."""
  acc = None
  for t, kv in enumerate(kv_steps):
    part = _run_row(cp.table[t], shard, run, q, *kv, *extra)
    acc = part if acc is None else merge_attentions(
        [acc[0], part[0]], [acc[1], part[1]], out_dtype=jnp.float32)
  return acc[0].astype(q.dtype), acc[1]


def _nothing(q, *_):
  """The partial attention of a device with no block to visit: zeros, lse -inf (which the
  merge weighs zero)."""
  return jnp.zeros(q.shape, q.dtype), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)


def _run_row(row: np.ndarray, shard, run, *args):
  """Device `shard` runs plan row[shard] (-1: `_nothing`), through lax.switch when devices
  differ."""
  choices = sorted(set(int(i) for i in row))
  branch = lambda i: _nothing if i < 0 else functools.partial(run, i)
  if len(choices) == 1:
    return branch(choices[0])(*args)
  position = np.array([choices.index(int(i)) for i in row], np.int32)
  return lax.switch(jnp.asarray(position)[shard], [branch(i) for i in choices], *args)


def _local_specs(mesh, context_axis, batch, heads, kv_heads, spatial_rank):
  batch_axes = _entry(_dividing_axes(mesh, tuple(a for a in BATCH_AXES if a != context_axis),
                                     [batch]))
  head_axes = _entry(_dividing_axes(mesh, tuple(a for a in HEAD_AXES if a != context_axis),
                                    [heads, kv_heads]))
  lead = (context_axis,) + (None,) * (spatial_rank - 1)
  qkv = P(batch_axes, *lead, head_axes, None)
  return qkv, P(batch_axes, *lead, head_axes), P(batch_axes, context_axis), batch_axes, head_axes


def _sharded(body, mesh, in_specs, out_specs, *args):
  """`body` under `jax.shard_map` on `mesh`. On meshes with explicit axes (`jax.make_mesh`'s
  default) shard_map takes only inputs already sharded as `in_specs`: reshard them (a no-op
  where they are; a collective where the caller's sharding differs)."""
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    target = ((lambda spec: spec) if isinstance(mesh, jax.sharding.AbstractMesh)
              else (lambda spec: jax.sharding.NamedSharding(mesh, spec)))
    args = [jax.sharding.reshard(x, target(spec)) for x, spec in zip(args, in_specs)]
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def _local_sizes(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def attention(query, key, value, mask, q_seg, kv_seg, *, mesh, context_axis, strategy,
              context_layout, backend, scale, block_q, block_kv, config, interpret,
              single_device, sinks=None, softcap=None):
  """`ops.attention` on a mesh: (out, lse [batch, seq_q, heads]) with batch and heads
  sharded over `BATCH_AXES`/`HEAD_AXES` where they divide, and the sequence over
  `context_axis` (None: not sharded; `single_device(q, k, v, q_seg, kv_seg, sinks)` runs
  per shard, `sinks` [heads] sharded with the heads: its kernels join them; with a
  context axis the caller joins them after the merge and passes None). `softcap`: the
  shards' logit soft-capping (per score, so the merge is unchanged)."""
  from . import ops
  b, sq, h, d = query.shape
  skv, hkv = key.shape[1], key.shape[2]
  qkv, lse_spec, seg_spec, batch_axes, head_axes = _local_specs(
      mesh, context_axis, b, h, hkv, 1)
  n = 1 if context_axis is None else mesh.shape[context_axis]
  has_seg = q_seg is not None
  seg_args = (q_seg, kv_seg) if has_seg else ()
  in_specs = (qkv, qkv, qkv) + ((seg_spec, seg_spec) if has_seg else ())
  if n == 1:
    if context_layout == "zigzag":
      raise ValueError("context_layout='zigzag' needs a context_axis of size > 1")
    sink_args = () if sinks is None else (sinks,)

    def body(q, k, v, *rest):
      segs, rest = (rest[:2], rest[2:]) if has_seg else ((None, None), rest)
      return single_device(q, k, v, *segs, *(rest or (None,)))

    return _sharded(body, mesh, in_specs + (P(head_axes),) * len(sink_args), (qkv, lse_spec),
                    query, key, value, *seg_args, *sink_args)
  if sinks is not None:
    raise ValueError("with a context axis, sinks are joined after the shards' merge")
  local_b = b // _local_sizes(mesh, batch_axes)
  local_hkv = hkv // _local_sizes(mesh, head_axes)
  row_bytes = 2 * local_b * local_hkv * d * jnp.dtype(key.dtype).itemsize + (4 if has_seg else 0)
  cp = plan_context(mask, sq, skv, n, block_q, block_kv, strategy, context_layout,
                    row_bytes, d, local_b * h // _local_sizes(mesh, head_axes))

  def run(i, q, k, v, ks, qs):
    # Segment ids skip the shard's cross-document blocks as on one device (`ops._segment_map`).
    return ops.run_plan(backend, cp.plans[i], scale, config, interpret, q, k, v, qs, ks,
                        block_map=ops._segment_map(backend, cp.plans[i], qs, ks),
                        softcap=softcap)

  def body(q, k, v, *segs):
    qs, ks = segs if segs else (None, None)
    shard = lax.axis_index(context_axis)
    if cp.strategy == "allgather":
      gather = lambda x: _gather(x, context_axis)
      return _run_row(cp.table[0], shard, run, q, gather(k), gather(v), gather(ks), qs)
    if cp.strategy == "halo":
      # The exchange is issued first: it overlaps the kernel on the device's own K/V.
      halos = zip(*(_halos(x, context_axis, n, *cp.halo) for x in (k, v, ks)))
      return _merge_steps(cp, shard, run, q, [(k, v, ks), *halos], qs)
    kv_steps = [(k, v, ks)]
    for _ in range(cp.steps - 1):
      # Each shard is sent on before the kernel that reads it: the two overlap.
      kv_steps.append(lax.ppermute(kv_steps[-1], context_axis,
                                   [(j, (j + 1) % n) for j in range(n)]))
    return _merge_steps(cp, shard, run, q, kv_steps, qs)

  return _sharded(body, mesh, in_specs, (qkv, lse_spec), query, key, value, *seg_args)


def routed(query, key, value, ids, q_seg, kv_seg, *, mesh, context_axis, single_device):
  """`ops.attention(..., block_selection=)` on a mesh: batch and heads sharded as in
  `attention` (the selection's [batch, heads, q blocks, k] ids with them), the sequence not
  (`context_axis` of size 1 or None). `single_device(q, k, v, ids, q_seg, kv_seg)` runs per
  shard. Returns (out, lse)."""
  b, _, h, _ = query.shape
  qkv, lse_spec, seg_spec, batch_axes, head_axes = _local_specs(
      mesh, context_axis, b, h, key.shape[2], 1)
  ids_spec = P(batch_axes, head_axes, None, None)
  has_seg = q_seg is not None
  in_specs = (qkv, qkv, qkv, ids_spec) + ((seg_spec, seg_spec) if has_seg else ())
  body = lambda q, k, v, i, *segs: single_device(q, k, v, i, *(segs or (None, None)))
  return _sharded(body, mesh, in_specs, (qkv, lse_spec), query, key, value, ids,
                  *((q_seg, kv_seg) if has_seg else ()))


@functools.lru_cache(maxsize=64)
def plan_routed(mask: masks_lib.Mask, seq_q: int, seq_kv: int, num_shards: int,
                block_size: int, context_layout: str = "contiguous") -> ContextPlan:
  """Plan content-routed attention (`routed_sequence`) with the sequence sharded
  `num_shards` ways: every device gathers all K/V and runs its Q shard's rows of the
  selection against it, so the local plans are (Q shard, all K/V in the gathered order);
  their static maps bound what the selection may visit (`block_map.from_selection`)."""
  n = num_shards
  check_options("allgather", context_layout)
  div = n * block_size * (2 if context_layout == "zigzag" else 1)
  for name, s in (("seq_q", seq_q), ("seq_kv", seq_kv)):
    if s % div:
      unit = "zigzag chunk" if context_layout == "zigzag" else "device"
      raise ValueError(f"with a block_selection, {name}={s} must be divisible by "
                       f"{div // block_size} x block_size ({block_size}): each {unit} holds "
                       "whole blocks")
  q_runs = _seq_shards(seq_q, n, context_layout)
  kv_runs = _seq_shards(seq_kv, n, context_layout)
  plans = _Plans(mask)
  every = SequenceLayout(seq_kv, block_size, tuple(r for runs in kv_runs for r in runs))
  table = np.array([[plans.add(SequenceLayout(seq_q // n, block_size, q_runs[s]), every)
                     for s in range(n)]], np.int32)
  return ContextPlan("allgather", n, tuple(plans.plans), table, (0, 0), 0, {})


def routed_sequence(query, key, value, mask, ids, q_seg, kv_seg, block_size: int, *, mesh,
                    context_axis, strategy, context_layout, run):
  """`ops.attention(..., block_selection=)` with the sequence sharded over `context_axis`
  (size > 1): batch and heads as in `attention`, the selection's query-block rows with the
  queries. Each device all-gathers K/V (and the keys' segment ids): a selection row may
  reach any block of the sequence. Top-k rows visit at most k blocks each, so contiguous
  shards are balanced without the zigzag order; with ``context_layout="zigzag"`` (a model
  whose other layers want it) the rows follow the queries' zigzag order and the ids stay
  sequence block numbers (`routing.select(..., zigzag_shards=)`), mapped here to the
  gathered K/V's order. `run(plan, q, k, v, ids, q_seg, kv_seg)` runs one local plan.
  Returns (out, lse)."""
  if strategy not in ("auto", "allgather"):
    raise ValueError(f"with a block_selection the sequence shards by strategy='allgather' "
                     f"(a selected block may be anywhere in the sequence), got {strategy!r}")
  b, sq, h, _ = query.shape
  skv, hkv = key.shape[1], key.shape[2]
  n = mesh.shape[context_axis]
  qkv, lse_spec, seg_spec, batch_axes, head_axes = _local_specs(mesh, context_axis, b, h,
                                                                hkv, 1)
  cp = plan_routed(mask, sq, skv, n, block_size, context_layout)
  ids_spec = P(batch_axes, head_axes, context_axis, None)
  has_seg = q_seg is not None
  if context_layout == "zigzag":  # sequence block numbers -> blocks of the gathered K/V
    nk = skv // block_size
    position = jnp.asarray(np.argsort(zigzag_permutation(nk, n)), jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < nk), position[jnp.clip(ids, 0, nk - 1)], -1)

  def local(i, q, k, v, ids, ks, qs):
    return run(cp.plans[i], q, k, v, ids, qs, ks)

  def body(q, k, v, ids, *segs):
    qs, ks = segs if segs else (None, None)
    gather = lambda x: _gather(x, context_axis)
    return _run_row(cp.table[0], lax.axis_index(context_axis), local, q, gather(k), gather(v),
                    ids, gather(ks), qs)

  in_specs = (qkv, qkv, qkv, ids_spec) + ((seg_spec, seg_spec) if has_seg else ())
  return _sharded(body, mesh, in_specs, (qkv, lse_spec), query, key, value, ids,
                  *((q_seg, kv_seg) if has_seg else ()))


def na(query, key, value, mask: masks_lib.Neighborhood, q_seg=None, kv_seg=None, *, mesh,
       context_axis, strategy, backend, scale, q_tile, kv_tile, config, interpret,
       single_device, backward_plan=None, softcap=None):
  """`ops.na` on a mesh: batch/heads as in `attention`, the leading spatial dim over
  `context_axis`. Returns (out, lse [batch, *spatial, heads]). q_seg, kv_seg: int32
  [batch, *spatial] segment ids (`ops._na_segments`: padding and packed images), sharded
  like the tokens, the keys' ids travelling with their K/V halos; with them the context
  axis must have size > 1 (`single_device` takes q, k, v only). `backward_plan(plan,
  fit_tile=)`: the backward kernels' own plan for a local plan (`ops._backward_plan`), or
  None. `softcap`: the shards' logit soft-capping."""
  from . import ops
  b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
  hkv = key.shape[-2]
  rank = query.ndim - 3
  qkv, lse_spec, _, batch_axes, head_axes = _local_specs(mesh, context_axis, b, h, hkv, rank)
  n = 1 if context_axis is None else mesh.shape[context_axis]
  has_seg = q_seg is not None
  if n == 1:
    if has_seg:
      raise ValueError("context_parallel.na: segment ids need a context axis of size > 1")
    return _sharded(single_device, mesh, (qkv,) * 3, (qkv, lse_spec), query, key, value)
  local_b = b // _local_sizes(mesh, batch_axes)
  local_hkv = hkv // _local_sizes(mesh, head_axes)
  row_bytes = ((2 * local_b * local_hkv * d * jnp.dtype(key.dtype).itemsize
                + (4 * local_b if has_seg else 0)) * math.prod(mask.spatial_shape[1:]))
  cp = plan_context_nd(mask, n, tuple(q_tile), tuple(kv_tile), strategy, row_bytes)
  size = mask.spatial_shape[0] // n
  # A local plan's relation is the same on every device that shares it: so is its
  # backward plan (built on the first such device's layouts).
  bwd = [backward_plan(p, fit_tile=lambda t: _fit_tile(t, size)) if backward_plan else None
         for p in cp.plans]

  def run(i, q, k, v, ks, qs):
    return ops.run_plan(backend, cp.plans[i], scale, config, interpret, q, k, v, qs, ks,
                        bwd_plan=bwd[i], softcap=softcap)

  def body(q, k, v, *segs):
    qs, ks = segs if segs else (None, None)
    shard = lax.axis_index(context_axis)
    if cp.strategy == "allgather":
      gather = lambda x: _gather(x, context_axis)
      return _run_row(cp.table[0], shard, run, q, gather(k), gather(v), gather(ks), qs)
    # The keys' segment ids travel with their halos (past the grid's ends the plans mask).
    halos = zip(*(_halos(x, context_axis, n, *cp.halo) for x in (k, v, ks)))
    return _merge_steps(cp, shard, run, q, [(k, v, ks), *halos], qs)

  seg_spec = P(batch_axes, context_axis, *(None,) * (rank - 1))
  return _sharded(body, mesh, (qkv,) * 3 + ((seg_spec,) * 2 if has_seg else ()),
                  (qkv, lse_spec), query, key, value, *((q_seg, kv_seg) if has_seg else ()))


def emulate(plan: ContextPlan, query, key, value, backend: str, *, layout: str = "contiguous",
            scale: float | None = None, config=None, interpret: bool = False, q_seg=None,
            kv_seg=None):
  """The sharded computation of `plan` on one device, shard after shard: the same local
  kernels, K/V parts and log-sum-exp merges every device runs, without the collectives.
  For testing kernels on shard plans (and where a multi-device interpreter is not
  available). query/key/value: the global arrays; q_seg, kv_seg: their int32 segment ids
  ([batch, *tokens], as `ops.run_plan` takes them; the keys' ids go with their K/V parts);
  returns the output in global order."""
  from . import ops
  n = plan.num_shards
  scale = scale or 1 / math.sqrt(query.shape[-1])
  run = lambda i, q, k, v, qs, ks: ops.run_plan(backend, plan.plans[i], scale, config,
                                                interpret, q, k, v, qs, ks)
  if q_seg is None:
    q_seg, kv_seg = (jnp.zeros(x.shape[:2], jnp.int32) for x in (query, key))  # not used
    run_seg = lambda i, q, k, v, qs, ks: run(i, q, k, v, None, None)
  else:
    run_seg = run
  left, right = plan.halo
  pad = lambda x: jnp.pad(x, [(0, 0), (left, right)] + [(0, 0)] * (x.ndim - 2))
  if plan.strategy != "halo":
    q_runs = _seq_shards(query.shape[1], n, layout)
    kv_runs = _seq_shards(key.shape[1], n, layout)
  take = lambda x, rs: jnp.concatenate([x[:, a:a + m] for a, m in rs], axis=1)
  size, kv_size = query.shape[1] // n, key.shape[1] // n
  outs = []
  kvs = (key, value, kv_seg)
  for s in range(n):
    if plan.strategy == "halo":
      q_s, qs_s = (x[:, s * size:(s + 1) * size] for x in (query, q_seg))
      own = s * kv_size
      parts = [tuple(x[:, own:own + kv_size] for x in kvs)]
      for rows, start in ((left, own), (right, own + left + kv_size)):
        if rows:
          parts.append(tuple(pad(x)[:, start:start + rows] for x in kvs))
    elif plan.strategy == "ring":
      q_s, qs_s = (take(x, q_runs[s]) for x in (query, q_seg))
      parts = [tuple(take(x, kv_runs[(s - t) % n]) for x in kvs) for t in range(plan.steps)]
    else:
      q_s, qs_s = (take(x, q_runs[s]) for x in (query, q_seg))
      parts = [tuple(take(x, [r for rs in kv_runs for r in rs]) for x in kvs)]
    acc = None
    for t, (k_t, v_t, ks_t) in enumerate(parts):
      i = int(plan.table[t, s])
      if i >= 0:
        part = run_seg(i, q_s, k_t, v_t, qs_s, ks_t)
        acc = part if acc is None else merge_attentions([acc[0], part[0]], [acc[1], part[1]],
                                                        out_dtype=jnp.float32)
    outs.append(jnp.zeros(q_s.shape, query.dtype) if acc is None else acc[0].astype(query.dtype))
  out = jnp.concatenate(outs, axis=1)
  if plan.strategy == "halo":
    return out
  order = np.concatenate([np.arange(a, a + m) for rs in q_runs for a, m in rs])
  return out[:, np.argsort(order)]


# --------------------------------------------------------------------------------------------
# Zigzag (head-tail) order for causal load balance.


def zigzag_permutation(seq: int, num_shards: int) -> np.ndarray:
  """Token order of the zigzag layout: shard i holds chunks i and 2N-1-i of 2N equal chunks.
  ``x[:, perm]`` is the zigzag order of x; the ``argsort`` undoes it."""
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) \
      or num_shards <= 0:
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
  if seq % (2 * num_shards):
    raise ValueError(f"seq ({seq}) must be divisible by 2 * num_shards ({2 * num_shards})")
  c = seq // (2 * num_shards)
  runs = _seq_shards(seq, num_shards, "zigzag")
  return np.concatenate([np.arange(s, s + c) for shard in runs for s, _ in shard])


def _take(x, index, axis):
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.take(x, xp.asarray(index), axis=axis)


def to_zigzag(x, num_shards: int, axis: int = 1):
  """Reorder the sequence axis of x into the zigzag layout: once, in the data loader, on
  host (NumPy, returned as NumPy) or unsharded arrays. Labels and segment ids get the same
  order; token-wise layers and losses need no other change."""
  return _take(x, zigzag_permutation(x.shape[axis], num_shards), axis)


def from_zigzag(x, num_shards: int, axis: int = 1):
  """Inverse of `to_zigzag` (host or unsharded arrays: gather a sharded output first)."""
  return _take(x, np.argsort(zigzag_permutation(x.shape[axis], num_shards)), axis)

