"""Block-sparse flash attention in Pallas for TPU (Mosaic), splash-attention style.

The block map is passed by scalar prefetch (SMEM). The grid is
(batch, heads, Q blocks, KV steps); the K/V `index_map` reads the visited-block id of step
``j`` from the prefetched map, so padding steps (``j >= count``) re-use the block already in
VMEM (the map repeats the last id: no DMA) and `pl.when` skips their compute. Full blocks take
a path with no mask arithmetic; partial blocks rebuild the element mask from the per-token
interval vectors (or the `from_function` mask) in-kernel. Running max / sum / accumulator live
in VMEM scratch across the KV steps.

Backward: a dQ kernel over the forward map and a dK/dV kernel over the transposed map whose
reduction axis walks (visiting Q block, query head of the GQA group): no atomics.

Mosaic tiling: the last two dims of every block must be multiples of (8, 128) or span the
array. So tensors are moved to [batch, heads, seq, head_dim] (head_dim is the full last dim),
block sizes are multiples of 128, query-side vectors are laid out [seq, dims] (sublane
columns) and key-side vectors [dims, seq] (lane rows), and row statistics are [.., seq, 1].
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jax_sparse_attn import backends
from jax_sparse_attn.merge import join_sink
from jax_sparse_attn.plan import AttentionPlan, any_term, intervals_per_term, walked_map
from jax_sparse_attn.softcap import capped, slope

NUM_LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def default_map_blocks(head_dim: int, dtype) -> tuple[int, int]:
  return 128, 128


def _check_blocks(plan: AttentionPlan):
  for name, b in (("block_q", plan.block_q), ("block_kv", plan.block_kv)):
    if b % NUM_LANES:
      raise ValueError(
          f"backend='mosaic' needs {name} to be a multiple of 128 (Mosaic tiles the last two "
          f"block dims by (8, 128): key-side mask vectors and lse rows put the sequence on "
          f"lanes), got {b}")


@dataclasses.dataclass(frozen=True)
class _MaskSpec:
  num_dims: int
  mask_fn: object
  has_segments: bool
  # Full blocks hold one segment id on both sides (a runtime map from segment ids,
  # `BlockMap.segments_full`): no segment test there.
  segments_full: bool = False
  # The interval dims are `terms` terms of num_dims // terms dims, OR'ed
  # (`plan.intervals_per_term`).
  terms: int = 1

  @property
  def full_masked(self) -> bool:
    """Whether full blocks need the element test (segment ids on every block)."""
    return self.has_segments and not self.segments_full


def _tile_mask(spec: _MaskSpec, q_lo_ref, q_hi_ref, kv_c_ref, q_seg_ref, kv_seg_ref, q_start,
               kv_start, bq, bk):

  def test(d):
    lo = q_lo_ref[:, d:d + 1]  # [bq, 1]
    hi = q_hi_ref[:, d:d + 1]
    c = kv_c_ref[d:d + 1, :]  # [1, bk]
    return (lo <= c) & (c <= hi)

  out = any_term(test, range(spec.num_dims), spec.terms)
  if spec.mask_fn is not None:
    qi = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    ki = kv_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    out = out & spec.mask_fn(qi, ki)
  if spec.has_segments:
    out = out & (q_seg_ref[...] == kv_seg_ref[...])  # [bq, 1] == [1, bk]
  return out


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret is True else (interpret or False)


def _to_bhsd(x):
  return x.transpose(0, 2, 1, 3)


def _mask_operands(plan: AttentionPlan, q_seg, kv_seg, q_index, kv_index, bq, bk, b_of, g_of=None):
  """Mask vectors and their BlockSpecs. `q_index(grid, refs)`/`kv_index` give block ids."""
  nd = plan.num_mask_dims
  arrays = [jnp.asarray(plan.q_lo.T), jnp.asarray(plan.q_hi.T), jnp.asarray(plan.kv_c)]
  specs = [pl.BlockSpec((bq, nd), lambda *a: (q_index(*a), 0)),
           pl.BlockSpec((bq, nd), lambda *a: (q_index(*a), 0)),
           pl.BlockSpec((nd, bk), lambda *a: (0, kv_index(*a)))]
  if q_seg is not None:
    arrays += [q_seg[:, :, None], kv_seg[:, None, :]]
    specs += [pl.BlockSpec((None, bq, 1), lambda *a: (b_of(*a), q_index(*a), 0)),
              pl.BlockSpec((None, 1, bk), lambda *a: (b_of(*a), 0, kv_index(*a)))]
  return arrays, specs


def _recompute_p(q, k, lse, scale, softcap=None):
  """(P = exp(s - lse), zero on rows that saw nothing (lse = -inf), and the scores s = q k^T
  * scale, soft-capped with `softcap`)."""
  s = capped(jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale,
             softcap)
  return jnp.exp(s - jnp.where(lse == -jnp.inf, jnp.inf, lse)), s


def _split_refs(refs, has_segments):
  n = 5 if has_segments else 3
  mask = list(refs[:n]) + ([None, None] if not has_segments else [])
  return mask, refs[n:]


def _full_then_partial(step, n_full, count, update, full_masked):
  """Grid step `step` of a map row: full blocks (masked only for segment ids tested there,
  `_MaskSpec.full_masked`), then partial ones; padding steps (step >= count) do nothing."""
  @pl.when(step < n_full)
  def _full():
    update(masked=full_masked)

  @pl.when((step >= n_full) & (step < count))
  def _partial():
    update(masked=True)


# --------------------------------------------------------------------------------------------
# Forward.


def _map_row(rows, bb, hh, i):
  """A grid step's map row: its block's, or with a runtime map (``rows``: (heads, blocks)
  per batch, `BlockMap.is_runtime`; one head: rows every head shares) its (batch, head,
  block)'s."""
  if rows is None:
    return i
  heads, blocks = rows
  return (bb * heads + (hh if heads > 1 else 0)) * blocks + i


def _fwd_kernel(ids_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, *refs, spec, scale, bq, bk,
                max_kv, rows=None, block0=0, sinks=False, softcap=None):
  """``sinks``: the first of `refs` holds learned sink logits [heads] (SMEM), joined to
  each row's softmax when the row is done (`merge.join_sink`); ``softcap``: scores
  soft-capped before the mask (`softcap.capped`)."""
  sinks_ref, refs = (refs[0], refs[1:]) if sinks else (None, refs)
  (q_lo, q_hi, kv_c, q_seg, kv_seg), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(
      refs, spec.has_segments)
  i, j = pl.program_id(2), pl.program_id(3)
  r = _map_row(rows, pl.program_id(0), pl.program_id(1), i)
  count, n_full = counts_ref[r], full_ref[r]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def update(masked):
    s = jax.lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
    s = capped(s * scale, softcap)
    if masked:
      kv_block = ids_ref[r * max_kv + j]
      keep = _tile_mask(spec, q_lo, q_hi, kv_c, q_seg, kv_seg, (i + block0) * bq, kv_block * bk,
                        bq, bk)
      s = jnp.where(keep, s, -jnp.inf)
    m_prev = m_sc[...]  # [bq, 128], lane-replicated
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, :1])
    alpha = jnp.exp(m_prev - m_safe)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], NN,
                             preferred_element_type=jnp.float32)
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv

  _full_then_partial(j, n_full, count, update, spec.full_masked)

  @pl.when(j == max_kv - 1)
  def _finish():
    l = l_sc[...][:, :1]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m_sc[...][:, :1] + jnp.log(l_safe), -jnp.inf)
    if sinks_ref is not None:  # acc / l * share: l / share is inf where share = 0
      lse, share = join_sink(lse, sinks_ref[pl.program_id(1)], seen)
      l_safe = l_safe / share
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = lse


def _runtime_map(plan: AttentionPlan, block_map):
  """The map to walk (`walked_map`) and its row layouts for `_map_row`, Q and KV side
  (None: the plan's static map)."""
  bmap = walked_map(plan, block_map)
  if block_map is None:
    return bmap, None, None
  h = bmap.kv_ids.shape[1]
  return bmap, (h, bmap.num_q_blocks), (h, bmap.num_kv_blocks)


# Scalar memory per TensorCore: 1 MiB on TPU v4 and later (16 KiB on v2/v3), jax's tpu_info.
# The block map is scalar-prefetched whole, so a call whose map rows exceed it cannot run:
# such calls run in chunks of map rows (blocks), each its own pallas_call. Half of the
# capacity is left to Mosaic's other scalars (as vLLM does for its block tables).
_SMEM_MAP_BUDGET = 512 * 1024


def _block_bytes(width: int, rows: int) -> int:
  """Scalar memory of one block's map rows: `rows` rows of `width` ids, a count and a full
  count each, int32."""
  return 4 * (width + 2) * rows


def map_block_fits(width: int, rows: int) -> bool:
  """Whether one block's map rows fit `_SMEM_MAP_BUDGET` (longer maps run in chunks of
  blocks, `_chunks`; a block over it cannot run)."""
  return _block_bytes(width, rows) <= _SMEM_MAP_BUDGET


def _chunks(ids, counts, full, runtime: bool, what: str):
  """[(first block, blocks, (ids, counts, full) of those rows)] so that each chunk's
  prefetched map fits `_SMEM_MAP_BUDGET`: one chunk for all but very long maps. Rows are
  the map's last-but-one axis (runtime maps: [batch, heads, blocks, width])."""
  ids, counts, full = (jnp.asarray(x) for x in (ids, counts, full))
  n, width = ids.shape[-2], ids.shape[-1]
  per_block = _block_bytes(width, ids.shape[0] * ids.shape[1] if runtime else 1)
  size = _SMEM_MAP_BUDGET // per_block
  if size < 1:
    raise ValueError(
        f"backend='mosaic': one {what} block's rows of the block map take {per_block} bytes "
        f"of scalar memory (width {width}"
        + (f", {ids.shape[0]} batch x {ids.shape[1]} heads" if runtime else "")
        + f"), over the {_SMEM_MAP_BUDGET}-byte budget: shard batch or heads over devices "
        "(`mesh=`) or select fewer blocks")
  out = []
  for b0 in range(0, n, size):
    rows = slice(b0, min(n, b0 + size))
    cut = (lambda x: x[:, :, rows]) if runtime else (lambda x: x[rows])
    out.append((b0, rows.stop - b0, (cut(ids).reshape(-1), cut(counts).reshape(-1),
                                     cut(full).reshape(-1))))
  return out


def _join(parts):
  """Chunk outputs [b, heads, blocks·block, ...] joined along the sequence."""
  return jnp.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def _forward_map_chunks(plan: AttentionPlan, bmap, rows, q_seg, kv_seg):
  """The forward map's calls (`_chunks` over Q blocks) for the forward and dQ kernels: first
  block, blocks, prefetched rows, the rows' layout (`_map_row`), the index functions of the
  Q block (global) and of the visited KV block, and the mask operands."""
  max_kv = bmap.max_kv
  for b0, n, prefetch in _chunks(bmap.kv_ids, bmap.kv_counts, bmap.kv_full_counts,
                                 rows is not None, "query"):
    rows_n = None if rows is None else (rows[0], n)
    kv_of = lambda bb, hh, i, j, ids, *_, r=rows_n: ids[_map_row(r, bb, hh, i) * max_kv + j]
    q_of = lambda bb, hh, i, *_, b0=b0: i + b0
    mask_arrays, mask_specs = _mask_operands(plan, q_seg, kv_seg, q_of, kv_of, plan.block_q,
                                             plan.block_kv, lambda bb, *_: bb)
    yield b0, n, prefetch, rows_n, q_of, kv_of, mask_arrays, mask_specs


def forward(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, config, interpret,
            block_map=None, sinks=None, softcap=None):
  """`block_map`: a runtime map (`block_map.from_selection`): rows per (batch, head, block),
  scalar-prefetched like the static map's. `sinks`: learned sink logits [heads] float32 (in
  scalar memory), joined to every row's softmax when it is done."""
  del config
  plan = intervals_per_term(plan)
  _check_blocks(plan)
  b, sq, h, d = q.shape
  g = h // k.shape[2]
  bq, bk = plan.block_q, plan.block_kv
  bmap, rows, _ = _runtime_map(plan, block_map)
  max_kv = bmap.max_kv
  spec = _MaskSpec(plan.num_mask_dims, plan.mask_fn, q_seg is not None,
                   bmap.segments_full, plan.terms)
  qt, kt, vt = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v)
  sink_arrays, sink_specs = [], []
  if sinks is not None:
    sink_arrays = [sinks.astype(jnp.float32)]
    sink_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)]
  outs = []
  for b0, n, prefetch, rows_n, q_of, kv_of, mask_arrays, mask_specs in _forward_map_chunks(
      plan, bmap, rows, q_seg, kv_seg):
    kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, bq=bq, bk=bk, max_kv=max_kv,
                               rows=rows_n, block0=b0, sinks=sinks is not None,
                               softcap=softcap)
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bb, hh, i, j, *r: (bb, hh // g, kv_of(bb, hh, i, j, *r), 0))
    outs.append(pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, h, n, max_kv),
            in_specs=[
                pl.BlockSpec((None, None, bq, d),
                             lambda bb, hh, i, j, *r: (bb, hh, q_of(bb, hh, i), 0)),
                kv_spec, kv_spec,
            ] + sink_specs + mask_specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, d), lambda bb, hh, i, j, *_: (bb, hh, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, j, *_: (bb, hh, i, 0)),
            ],
            scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                            pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, h, n * bq, d), q.dtype),
                   jax.ShapeDtypeStruct((b, h, n * bq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="sparse_attention_fwd_tpu",
    )(*prefetch, qt, kt, vt, *sink_arrays, *mask_arrays))
  out, lse = (_join(x) for x in zip(*outs))
  return _to_bhsd(out), lse[..., 0]


# --------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(ids_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, spec, scale, bq, bk, max_kv, rows=None, block0=0, softcap=None):
  (q_lo, q_hi, kv_c, q_seg, kv_seg), (dq_ref, dq_sc) = _split_refs(refs, spec.has_segments)
  i, j = pl.program_id(2), pl.program_id(3)
  r = _map_row(rows, pl.program_id(0), pl.program_id(1), i)
  count, n_full = counts_ref[r], full_ref[r]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  def update(masked):
    k = k_ref[...]
    p, s = _recompute_p(q_ref[...], k, lse_ref[...], scale, softcap)
    if masked:
      kv_block = ids_ref[r * max_kv + j]
      keep = _tile_mask(spec, q_lo, q_hi, kv_c, q_seg, kv_seg, (i + block0) * bq, kv_block * bk,
                        bq, bk)
      p = jnp.where(keep, p, 0.0)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if softcap is not None:  # through the cap
      ds = ds * slope(s, softcap)
    dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, NN,
                                      preferred_element_type=jnp.float32)

  _full_then_partial(j, n_full, count, update, spec.full_masked)

  @pl.when(j == max_kv - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(ids_ref, counts_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, spec, scale, bq, bk, max_q, group, rows=None, block0=0, softcap=None):
  (q_lo, q_hi, kv_c, q_seg, kv_seg), (dk_ref, dv_ref, dk_sc, dv_sc) = _split_refs(
      refs, spec.has_segments)
  i, t = pl.program_id(2), pl.program_id(3)
  entry = t // group
  # Runtime maps: the transposed rows of the step's query head.
  r = _map_row(rows, pl.program_id(0), pl.program_id(1) * group + t % group, i)
  count, n_full = counts_ref[r], full_ref[r]

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  def update(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p, s = _recompute_p(q, k, lse_ref[...], scale, softcap)
    if masked:
      q_block = ids_ref[r * max_q + entry]
      keep = _tile_mask(spec, q_lo, q_hi, kv_c, q_seg, kv_seg, q_block * bq, (i + block0) * bk,
                        bq, bk)
      p = jnp.where(keep, p, 0.0)
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, TN,
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if softcap is not None:  # through the cap
      ds = ds * slope(s, softcap)
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, TN,
                                      preferred_element_type=jnp.float32)

  _full_then_partial(entry, n_full, count, update, spec.full_masked)

  @pl.when(t == max_q * group - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: AttentionPlan, scale: float,
             config, interpret, block_map=None, softcap=None):
  del config
  plan = intervals_per_term(plan)
  _check_blocks(plan)
  b, sq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  bq, bk = plan.block_q, plan.block_kv
  bmap, rows, t_rows = _runtime_map(plan, block_map)
  spec = _MaskSpec(plan.num_mask_dims, plan.mask_fn, q_seg is not None,
                   bmap.segments_full, plan.terms)
  delta = backends.backward_delta(out, d_out, d_lse)[..., None]  # [b, h, sq, 1]
  lse4 = lse[..., None]
  qt, kt, vt, dot_ = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), _to_bhsd(d_out)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dQ over the forward map.
  max_kv = bmap.max_kv
  dqs = []
  for b0, n, prefetch, rows_n, q_of, kv_of, mask_arrays, mask_specs in _forward_map_chunks(
      plan, bmap, rows, q_seg, kv_seg):
    q_spec = pl.BlockSpec((None, None, bq, d),
                          lambda bb, hh, i, j, *r: (bb, hh, q_of(bb, hh, i), 0))
    row_spec = pl.BlockSpec((None, None, bq, 1),
                            lambda bb, hh, i, j, *r: (bb, hh, q_of(bb, hh, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bb, hh, i, j, *r: (bb, hh // g, kv_of(bb, hh, i, j, *r), 0))
    dqs.append(pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, scale=scale, bq=bq, bk=bk, max_kv=max_kv,
                          rows=rows_n, block0=b0, softcap=softcap),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, n, max_kv),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + mask_specs,
            out_specs=pl.BlockSpec((None, None, bq, d), lambda bb, hh, i, j, *_: (bb, hh, i, 0)),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, h, n * bq, d), q.dtype),
        compiler_params=params, interpret=_interpret(interpret), name="sparse_attention_dq_tpu",
    )(*prefetch, qt, kt, vt, dot_, lse4, delta, *mask_arrays))
  dq = _join(dqs)

  # dK/dV over the transposed map; the reduction axis walks (Q block entry, group head).
  max_q = bmap.max_q
  head_of = lambda hh, t: hh * g + t % g
  dks, dvs = [], []
  for b0, n, prefetch in _chunks(bmap.q_ids, bmap.q_counts, bmap.q_full_counts,
                                 t_rows is not None, "key"):
    rows_n = None if t_rows is None else (t_rows[0], n)
    q_of = lambda bb, hh, i, t, ids, *_, r=rows_n: ids[
        _map_row(r, bb, head_of(hh, t), i) * max_q + t // g]
    kv_of = lambda bb, hh, i, *_, b0=b0: i + b0
    mask_arrays, mask_specs = _mask_operands(plan, q_seg, kv_seg, q_of, kv_of, bq, bk,
                                             lambda bb, *_: bb)
    qg_spec = pl.BlockSpec((None, None, bq, d), lambda bb, hh, i, t, *r: (
        bb, head_of(hh, t), q_of(bb, hh, i, t, *r), 0))
    rowg_spec = pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, t, *r: (
        bb, head_of(hh, t), q_of(bb, hh, i, t, *r), 0))
    own_kv = pl.BlockSpec((None, None, bk, d),
                          lambda bb, hh, i, t, *_: (bb, hh, kv_of(bb, hh, i), 0))
    out_kv = pl.BlockSpec((None, None, bk, d), lambda bb, hh, i, t, *_: (bb, hh, i, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, scale=scale, bq=bq, bk=bk, max_q=max_q,
                          group=g, rows=rows_n, block0=b0, softcap=softcap),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, n, max_q * g),
            in_specs=[qg_spec, own_kv, own_kv, qg_spec, rowg_spec, rowg_spec] + mask_specs,
            out_specs=[out_kv, out_kv],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, n * bk, d), k.dtype),
                   jax.ShapeDtypeStruct((b, hkv, n * bk, d), v.dtype)],
        compiler_params=params, interpret=_interpret(interpret), name="sparse_attention_dkv_tpu",
    )(*prefetch, qt, kt, vt, dot_, lse4, delta, *mask_arrays)
    dks.append(dk)
    dvs.append(dv)
  dk, dv = _join(dks), _join(dvs)
  return _to_bhsd(dq), _to_bhsd(dk), _to_bhsd(dv)


# --------------------------------------------------------------------------------------------
# Lowering without a TPU.


def tpu_target(device_kind: str = "TPU v5e", num_cores: int = 1):
  """Context manager that makes Mosaic lower for `device_kind` on a machine with no TPU.

  Use with ``jax.export.export(jax.jit(f), platforms=("tpu",))`` to check that kernels lower.
  """
  return _tpu_target(device_kind, num_cores)


@contextlib.contextmanager
def _tpu_target(device_kind: str, num_cores: int):
  from jax._src import mesh as mesh_lib
  device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh), backends.target("tpu"):
    yield


def export_for_tpu(fn, *args, device_kind: str = "TPU v5e"):
  """Export `fn` (jitted) for TPU; returns the `jax.export.Exported`. Args: ShapeDtypeStructs."""
  with tpu_target(device_kind):
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
