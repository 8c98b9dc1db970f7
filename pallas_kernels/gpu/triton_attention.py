"""Block-sparse flash attention in Pallas with the Triton lowering (any CUDA GPU Pallas supports).

Three kernels, each reading the block map (`jax_sparse_attn.block_map`):

* forward: grid (Q tiles, batch*heads). Load the Q tile once, loop over the visited KV blocks
  (full blocks first with no mask arithmetic, then partial blocks with the element mask
  rebuilt from the per-token interval vectors), online softmax in float32 (base 2, the scale
  folded into one multiply), write O and the log-sum-exp.
* dQ: grid (Q tiles, batch*heads), the same loop, recomputing P from the saved LSE.
* dK/dV: grid (KV tiles, batch*kv_heads), looping over the transposed map (the Q blocks that
  visit this KV block) and over the query heads of the GQA group: no atomics.

Kernel tiles (``TritonConfig``) may be smaller than the block-map blocks: a block-map block of
128 rows is processed as two programs of 64 rows, etc. Arrays are in kernel order (see
`jax_sparse_attn.plan`): q [batch, padded_q, heads, head_dim]; k, v [batch, padded_kv,
kv_heads, head_dim]; lse [batch, heads, padded_q] float32 (natural log).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_sparse_attn.plan import AttentionPlan

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Tile sizes and launch parameters. Tiles must divide the block-map block sizes.

  ``block_*``/``num_*``: forward kernel; ``bwd_*``: dK/dV kernel; ``dq_*``: dQ kernel.

  ``None`` fields take the tuned defaults for (head_dim, dtype) from `default_config`.
  fp32 inputs use full-precision (IEEE) dots unless ``allow_tf32``.
  """
  block_q: int | None = None
  block_kv: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  bwd_block_q: int | None = None
  bwd_block_kv: int | None = None
  bwd_num_warps: int | None = None
  bwd_num_stages: int | None = None
  dq_block_q: int | None = None
  dq_block_kv: int | None = None
  dq_num_warps: int | None = None
  dq_num_stages: int | None = None
  allow_tf32: bool = False
  # One loop per partial-dims group (tests only the partial dims) instead of one partial loop
  # testing every dim. Measured slower on the H100 (2-D NA 128x128 k33, tiled order: 1.80 ms vs
  # 1.62 ms; 3-D: 10.6 vs 7.96 ms): each extra pipelined loop costs more than the masks saved.
  split_partial_groups: bool = False
  # One loop over every visited block with the element mask always applied (no separate
  # full-block loop): fewer pipelined loops per row, more mask arithmetic.
  single_loop: bool = False
  # Test each mask interval with one unsigned compare, (c - lo) <=u (hi - lo), instead of two
  # signed compares and an AND.
  unsigned_intervals: bool = True


# Measured on the H100 (bf16, dense S=16384; benchmarks/results/h100-2026-11-23-triton-sweep*.json):
# padded head_dim -> block-map blocks and (tile_q, tile_kv, warps, stages) per kernel.
# 256 is not tuned (smaller tiles, 8 warps, to fit registers).
TUNED = {
    64: dict(map=(128, 128), fwd=(128, 128, 4, 2), dq=(128, 64, 4, 2), dkv=(128, 64, 4, 2)),
    128: dict(map=(128, 64), fwd=(128, 64, 4, 2), dq=(64, 64, 4, 2), dkv=(64, 64, 4, 2)),
    256: dict(map=(64, 64), fwd=(64, 64, 8, 2), dq=(64, 64, 8, 2), dkv=(64, 64, 8, 2)),
}


def _tuned(head_dim: int) -> dict:
  d = _padded_head_dim(head_dim)
  return TUNED[min(max(d, 64), 256)]


def default_map_blocks(head_dim: int, dtype) -> tuple[int, int]:
  return _tuned(head_dim)["map"]


def default_config(head_dim: int, dtype, plan: AttentionPlan, config: TritonConfig | None):
  config = config or TritonConfig()
  table = _tuned(head_dim)
  bq, bk = plan.block_q, plan.block_kv
  fill = lambda v, default: default if v is None else v
  fwd, dq, dkv = table["fwd"], table["dq"], table["dkv"]
  cfg = TritonConfig(
      block_q=fill(config.block_q, min(bq, fwd[0])),
      block_kv=fill(config.block_kv, min(bk, fwd[1])),
      num_warps=fill(config.num_warps, fwd[2]),
      num_stages=fill(config.num_stages, fwd[3]),
      bwd_block_q=fill(config.bwd_block_q, min(bq, dkv[0])),
      bwd_block_kv=fill(config.bwd_block_kv, min(bk, dkv[1])),
      bwd_num_warps=fill(config.bwd_num_warps, dkv[2]),
      bwd_num_stages=fill(config.bwd_num_stages, dkv[3]),
      dq_block_q=fill(config.dq_block_q, min(bq, dq[0])),
      dq_block_kv=fill(config.dq_block_kv, min(bk, dq[1])),
      dq_num_warps=fill(config.dq_num_warps, dq[2]),
      dq_num_stages=fill(config.dq_num_stages, dq[3]),
      allow_tf32=config.allow_tf32, split_partial_groups=config.split_partial_groups,
      single_loop=config.single_loop, unsigned_intervals=config.unsigned_intervals)
  for name, tile, block in (("block_q", cfg.block_q, bq), ("block_kv", cfg.block_kv, bk),
                            ("bwd_block_q", cfg.bwd_block_q, bq),
                            ("bwd_block_kv", cfg.bwd_block_kv, bk),
                            ("dq_block_q", cfg.dq_block_q, bq), ("dq_block_kv", cfg.dq_block_kv, bk)):
    if tile <= 0 or tile & (tile - 1) or block % tile:
      raise ValueError(f"TritonConfig.{name}={tile} must be a power of two dividing the "
                       f"block-map block size {block}")
  return cfg


def _padded_head_dim(d: int) -> int:
  return max(16, pl.next_power_of_2(d))


# --------------------------------------------------------------------------------------------
# Element mask of one (Q tile, KV tile) pair.


@dataclasses.dataclass(frozen=True)
class _MaskSpec:
  num_dims: int
  mask_fn: object  # Mask or None, evaluated on positions (sequence layouts only)
  has_segments: bool
  partial_groups: tuple = (None,)  # per partial group, the interval dims to test
  single_loop: bool = False
  unsigned: bool = False  # q vectors hold (lo, hi - lo) for the unsigned test


def _mask_spec(plan: AttentionPlan, has_segments: bool, cfg: TritonConfig) -> _MaskSpec:
  groups = tuple(plan.block_map.partial_groups) if cfg.split_partial_groups else (None,)
  return _MaskSpec(plan.num_mask_dims, plan.mask_fn, has_segments, groups, cfg.single_loop,
                   cfg.unsigned_intervals)


def _run_groups(spec: _MaskSpec, counts_ref, sub: int, body, carry):
  """Full blocks (no element mask unless segments), then each partial group with its dims.

  counts_ref: [n_full, total, end of group 1, ..., end of group G] for this row."""
  if spec.single_loop:
    return jax.lax.fori_loop(0, counts_ref[1] * sub, functools.partial(
        body, masked=True, dims=None), carry)
  start = counts_ref[0] * sub
  carry = jax.lax.fori_loop(0, start, functools.partial(
      body, masked=spec.has_segments, dims=()), carry)
  for g, dims in enumerate(spec.partial_groups):
    # Without splitting, the one partial loop runs to the row's total count.
    end = (counts_ref[2 + g] if len(spec.partial_groups) > 1 else counts_ref[1]) * sub
    carry = jax.lax.fori_loop(start, end, functools.partial(body, masked=True, dims=dims), carry)
    start = end
  return carry


def _tile_mask(spec: _MaskSpec, refs, q_start, kv_start, tq: int, tk: int,
               transposed: bool = False, dims=None):
  """Boolean [tq, tk] (or [tk, tq] if `transposed`): interval dims AND mask_fn AND segments.

  `dims`: the interval dims to test (None = all); the block map guarantees the others pass.
  """
  q_lo, q_hi, kv_c, q_seg, kv_seg = refs
  # Broadcast a per-query vector along rows (or columns when transposed), same for keys.
  qv = (lambda x: x[None, :]) if transposed else (lambda x: x[:, None])
  kv = (lambda x: x[:, None]) if transposed else (lambda x: x[None, :])
  out = None
  for d in (range(spec.num_dims) if dims is None else dims):
    lo = qv(q_lo[d][pl.ds(q_start, tq)])
    hi = qv(q_hi[d][pl.ds(q_start, tq)])
    c = kv(kv_c[d][pl.ds(kv_start, tk)])
    if spec.unsigned:  # `hi` holds the width; empty intervals have lo = 2**30, width 0
      term = (c - lo).astype(jnp.uint32) <= hi.astype(jnp.uint32)
    else:
      term = (lo <= c) & (c <= hi)
    out = term if out is None else out & term
  if out is None:
    out = jnp.ones((tk, tq) if transposed else (tq, tk), jnp.bool_)
  if spec.mask_fn is not None:
    shape = (tk, tq) if transposed else (tq, tk)
    qi = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1 if transposed else 0)
    ki = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0 if transposed else 1)
    out = out & spec.mask_fn(qi, ki)
  if spec.has_segments:
    out = out & (qv(q_seg[pl.ds(q_start, tq)]) == kv(kv_seg[pl.ds(kv_start, tk)]))
  return out


def _dot(a, b, allow_tf32, trans_b=False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  precision = None
  if a.dtype == jnp.float32 and not allow_tf32:
    precision = jax.lax.Precision.HIGHEST
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             precision=precision)


# --------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, *rest, spec: _MaskSpec, scale: float,
                block_q: int, block_kv: int, tq: int, tk: int, head_dim: int, allow_tf32: bool):
  mask_refs, (o_ref, lse_ref) = _split_mask_refs(rest, spec), rest[-2:]
  q_start = pl.program_id(0) * tq
  dpad = q_ref.shape[-1]
  dmask = (jnp.arange(dpad) < head_dim)[None, :] if dpad != head_dim else None
  q = q_ref[...] if dmask is None else plgpu.load(q_ref, mask=dmask, other=0.0)
  qk_scale = scale * LOG2E
  sub = block_kv // tk  # kernel tiles per block-map block: one flat loop keeps pipelining

  def body(t, carry, masked, dims):
    acc, m_prev, l_prev = carry
    kv_start = pl.multiple_of(_block_start(ids_ref, t, sub, block_kv, tk), tk)
    kv_slice = pl.ds(kv_start, tk)
    k = _load_rows(k_ref, kv_slice, dmask)
    s = _dot(q, k, allow_tf32, trans_b=True) * qk_scale
    if masked:
      s = jnp.where(_tile_mask(spec, mask_refs, q_start, kv_start, tq, tk, dims=dims), s,
                    -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    p = jnp.exp2(s - m_safe[:, None])
    alpha = jnp.exp2(m_prev - m_safe)
    v = _load_rows(v_ref, kv_slice, dmask)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, allow_tf32)
    carry = (acc, m_new, l_prev * alpha + jnp.sum(p, axis=1))
    return carry

  init = (jnp.zeros((tq, dpad), jnp.float32), jnp.full((tq,), -jnp.inf, jnp.float32),
          jnp.zeros((tq,), jnp.float32))
  acc, m, l = _run_groups(spec, counts_ref, sub, body, init)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out = acc / l_safe[:, None]
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
  if dmask is None:
    o_ref[...] = out.astype(o_ref.dtype)
  else:
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=dmask)


def _block_start(ids_ref, t, sub: int, block: int, tile: int):
  """Start row of the t-th kernel tile of a map row (`sub` tiles per map block)."""
  if sub == 1:
    return ids_ref[t] * block
  # lax.div/rem: t >= 0, and Triton lowers them directly (jnp's floor division adds selects).
  return ids_ref[jax.lax.div(t, sub)] * block + jax.lax.rem(t, sub) * tile


def _load_rows(ref, rows, dmask):
  if dmask is None:
    return ref[rows, :]
  return plgpu.load(ref.at[rows, :], mask=dmask, other=0.0)


def _split_mask_refs(rest, spec: _MaskSpec):
  nd = spec.num_dims
  q_lo, q_hi, kv_c = rest[:nd], rest[nd:2 * nd], rest[2 * nd:3 * nd]
  q_seg = kv_seg = None
  if spec.has_segments:
    q_seg, kv_seg = rest[3 * nd], rest[3 * nd + 1]
  return q_lo, q_hi, kv_c, q_seg, kv_seg


def _mask_inputs(plan: AttentionPlan, q_seg, kv_seg, b_of, unsigned=False):
  """Arrays and BlockSpecs for the mask vectors; `b_of(j)` maps grid axis 1 to the batch."""
  arrays, specs = [], []
  q_lo, q_hi = plan.q_lo, plan.q_hi
  if unsigned:
    empty = q_hi < q_lo
    q_lo, q_hi = np.where(empty, 1 << 30, q_lo), np.where(empty, 0, q_hi - q_lo)
  for vec in (q_lo, q_hi, plan.kv_c):
    for d in range(vec.shape[0]):
      arrays.append(jnp.asarray(vec[d]))
      specs.append(pl.BlockSpec((vec.shape[1],), lambda i, j: (0,)))
  if q_seg is not None:
    for seg in (q_seg, kv_seg):
      arrays.append(seg)
      specs.append(pl.BlockSpec((None, seg.shape[1]), lambda i, j: (b_of(j), 0)))
  return arrays, specs


def _counts_array(counts, full_counts, group_ends):
  """[rows, pow2 >= 2 + groups]: n_full, total, then the end of each partial group."""
  cols = [jnp.asarray(full_counts, jnp.int32)[:, None], jnp.asarray(counts, jnp.int32)[:, None],
          jnp.asarray(group_ends, jnp.int32)]
  arr = jnp.concatenate(cols, axis=1)
  width = pl.next_power_of_2(arr.shape[1])
  return jnp.pad(arr, ((0, 0), (0, width - arr.shape[1])))


def _pad_head_dim(*xs):
  d = xs[0].shape[-1]
  dpad = _padded_head_dim(d)
  if dpad == d:
    return xs
  return tuple(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dpad - d)]) for x in xs)


def forward(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, config, interpret):
  b, sq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  cfg = default_config(d, q.dtype, plan, config)
  tq, tk = cfg.block_q, cfg.block_kv
  bmap = plan.block_map
  spec = _mask_spec(plan, q_seg is not None, cfg)
  n_cols = pl.next_power_of_2(2 + len(bmap.partial_groups))
  qp, kp, vp = _pad_head_dim(q, k, v)
  dpad = qp.shape[-1]
  skv = k.shape[1]
  mask_arrays, mask_specs = _mask_inputs(plan, q_seg, kv_seg, lambda j: j // h, spec.unsigned)
  sub = plan.block_q // tq
  kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, block_q=plan.block_q,
                             block_kv=plan.block_kv, tq=tq, tk=tk, head_dim=d,
                             allow_tf32=cfg.allow_tf32)
  out, lse = pl.pallas_call(
      kernel,
      grid=(sq // tq, b * h),
      in_specs=[
          pl.BlockSpec((None, bmap.max_kv), lambda i, j: (i // sub, 0)),
          pl.BlockSpec((None, n_cols), lambda i, j: (i // sub, 0)),
          pl.BlockSpec((None, tq, None, dpad), lambda i, j: (j // h, i, j % h, 0)),
          pl.BlockSpec((None, skv, None, dpad), lambda i, j: (j // h, 0, (j % h) // g, 0)),
          pl.BlockSpec((None, skv, None, dpad), lambda i, j: (j // h, 0, (j % h) // g, 0)),
      ] + mask_specs,
      out_specs=[
          pl.BlockSpec((None, tq, None, dpad), lambda i, j: (j // h, i, j % h, 0)),
          pl.BlockSpec((None, None, tq), lambda i, j: (j // h, j % h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, sq, h, dpad), q.dtype),
                 jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="sparse_attention_fwd",
  )(jnp.asarray(bmap.kv_ids), _counts_array(bmap.kv_counts, bmap.kv_full_counts, bmap.kv_group_ends), qp, kp, vp,
    *mask_arrays)
  return out[..., :d], lse


# --------------------------------------------------------------------------------------------
# Backward: dQ.


def _dq_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               spec, scale, block_q, block_kv, tq, tk, head_dim, allow_tf32):
  mask_refs, dq_ref = _split_mask_refs(rest, spec), rest[-1]
  q_sub = pl.program_id(0)
  q_start = q_sub * tq
  dpad = q_ref.shape[-1]
  dmask = (jnp.arange(dpad) < head_dim)[None, :] if dpad != head_dim else None
  q = q_ref[...] if dmask is None else plgpu.load(q_ref, mask=dmask, other=0.0)
  do = do_ref[...] if dmask is None else plgpu.load(do_ref, mask=dmask, other=0.0)
  lse = lse_ref[...]
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  delta = delta_ref[...]
  qk_scale = scale * LOG2E
  sub = block_kv // tk

  def body(t, dq, masked, dims):
    kv_start = pl.multiple_of(_block_start(ids_ref, t, sub, block_kv, tk), tk)
    kv_slice = pl.ds(kv_start, tk)
    k = _load_rows(k_ref, kv_slice, dmask)
    v = _load_rows(v_ref, kv_slice, dmask)
    s = _dot(q, k, allow_tf32, trans_b=True) * qk_scale
    p = jnp.exp2(s - lse2[:, None])
    if masked:
      p = jnp.where(_tile_mask(spec, mask_refs, q_start, kv_start, tq, tk, dims=dims), p, 0.0)
    dp = _dot(do, v, allow_tf32, trans_b=True)
    ds = p * (dp - delta[:, None])
    dq = dq + _dot(ds.astype(k.dtype), k, allow_tf32)
    return dq

  dq = _run_groups(spec, counts_ref, sub, body, jnp.zeros((tq, dpad), jnp.float32))
  dq = (dq * scale).astype(dq_ref.dtype)
  if dmask is None:
    dq_ref[...] = dq
  else:
    plgpu.store(dq_ref, dq, mask=dmask)


# --------------------------------------------------------------------------------------------
# Backward: dK/dV.


def _dkv_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                spec, scale, block_q, block_kv, tq, tk, head_dim, group, allow_tf32):
  mask_refs, (dk_ref, dv_ref) = _split_mask_refs(rest, spec), rest[-2:]
  kv_sub = pl.program_id(0)
  kv_start = kv_sub * tk
  dpad = k_ref.shape[-1]
  dmask = (jnp.arange(dpad) < head_dim)[None, :] if dpad != head_dim else None
  k = k_ref[...] if dmask is None else plgpu.load(k_ref, mask=dmask, other=0.0)
  v = v_ref[...] if dmask is None else plgpu.load(v_ref, mask=dmask, other=0.0)
  qk_scale = scale * LOG2E
  sub = block_q // tq

  def body(t, carry, masked, dims, head):
    head = jnp.int32(head)  # a traced index (static ints trip the interpret-mode discharge)
    dk, dv = carry
    q_start = pl.multiple_of(_block_start(ids_ref, t, sub, block_q, tq), tq)
    rows = pl.ds(q_start, tq)
    q = _load_head_rows(q_ref, rows, head, group, dmask)
    do = _load_head_rows(do_ref, rows, head, group, dmask)
    lse = lse_ref[head, rows] if group > 1 else lse_ref[rows]
    delta = delta_ref[head, rows] if group > 1 else delta_ref[rows]
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    # Work in the transposed domain (rows = keys) so every dot is A @ B or A @ B^T.
    s_t = _dot(k, q, allow_tf32, trans_b=True) * qk_scale  # [tk, tq]
    p_t = jnp.exp2(s_t - lse2[None, :])
    if masked:
      p_t = jnp.where(_tile_mask(spec, mask_refs, q_start, kv_start, tq, tk, transposed=True,
                                 dims=dims), p_t, 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do, allow_tf32)
    dp_t = _dot(v, do, allow_tf32, trans_b=True)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + _dot(ds_t.astype(q.dtype), q, allow_tf32)
    carry = (dk, dv)
    return carry

  carry = (jnp.zeros((tk, dpad), jnp.float32), jnp.zeros((tk, dpad), jnp.float32))
  for head in range(group):  # GQA: the query heads sharing this KV head
    carry = _run_groups(spec, counts_ref, sub, functools.partial(body, head=head), carry)
  dk, dv = carry
  dk = (dk * scale).astype(dk_ref.dtype)
  dv = dv.astype(dv_ref.dtype)
  if dmask is None:
    dk_ref[...] = dk
    dv_ref[...] = dv
  else:
    plgpu.store(dk_ref, dk, mask=dmask)
    plgpu.store(dv_ref, dv, mask=dmask)


def _load_head_rows(ref, rows, head, group, dmask):
  if group == 1:
    return _load_rows(ref, rows, dmask)
  if dmask is None:
    return ref[rows, head, :]
  return plgpu.load(ref.at[rows, head, :], mask=dmask, other=0.0)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: AttentionPlan, scale: float,
             config, interpret):
  b, sq, h, d = q.shape
  skv, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  cfg = default_config(d, q.dtype, plan, config)
  bmap = plan.block_map
  spec = _mask_spec(plan, q_seg is not None, cfg)
  n_cols = pl.next_power_of_2(2 + len(bmap.partial_groups))
  # delta = rowsum(dO * O) - dLSE: one fused elementwise pass.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.transpose(0, 2, 1) - d_lse  # [b, h, sq]
  qp, kp, vp, dop = _pad_head_dim(q, k, v, d_out)
  dpad = qp.shape[-1]
  params = plgpu.CompilerParams(num_warps=cfg.dq_num_warps, num_stages=cfg.dq_num_stages)

  # dQ over the forward map.
  tq, tk = cfg.dq_block_q, cfg.dq_block_kv
  sub = plan.block_q // tq
  mask_arrays, mask_specs = _mask_inputs(plan, q_seg, kv_seg, lambda j: j // h, spec.unsigned)
  q_spec = pl.BlockSpec((None, tq, None, dpad), lambda i, j: (j // h, i, j % h, 0))
  kv_full = pl.BlockSpec((None, skv, None, dpad), lambda i, j: (j // h, 0, (j % h) // g, 0))
  row_spec = pl.BlockSpec((None, None, tq), lambda i, j: (j // h, j % h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, scale=scale, block_q=plan.block_q,
                        block_kv=plan.block_kv, tq=tq, tk=tk, head_dim=d,
                        allow_tf32=cfg.allow_tf32),
      grid=(sq // tq, b * h),
      in_specs=[pl.BlockSpec((None, bmap.max_kv), lambda i, j: (i // sub, 0)),
                pl.BlockSpec((None, n_cols), lambda i, j: (i // sub, 0)),
                q_spec, kv_full, kv_full, q_spec, row_spec, row_spec] + mask_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, sq, h, dpad), q.dtype),
      compiler_params=params, interpret=interpret, name="sparse_attention_dq",
  )(jnp.asarray(bmap.kv_ids), _counts_array(bmap.kv_counts, bmap.kv_full_counts, bmap.kv_group_ends), qp, kp, vp,
    dop, lse, delta, *mask_arrays)

  # dK/dV over the transposed map; the GQA group's query heads in one program.
  params = plgpu.CompilerParams(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
  tq, tk = cfg.bwd_block_q, cfg.bwd_block_kv
  sub_kv = plan.block_kv // tk
  mask_arrays, mask_specs = _mask_inputs(plan, q_seg, kv_seg, lambda j: j // hkv, spec.unsigned)
  if g == 1:
    q_all = pl.BlockSpec((None, sq, None, dpad), lambda i, j: (j // hkv, 0, j % hkv, 0))
    rows_all = pl.BlockSpec((None, None, sq), lambda i, j: (j // hkv, j % hkv, 0))
  else:
    q_all = pl.BlockSpec((None, sq, g, dpad), lambda i, j: (j // hkv, 0, j % hkv, 0))
    rows_all = pl.BlockSpec((None, g, sq), lambda i, j: (j // hkv, j % hkv, 0))
  kv_spec = pl.BlockSpec((None, tk, None, dpad), lambda i, j: (j // hkv, i, j % hkv, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, scale=scale, block_q=plan.block_q,
                        block_kv=plan.block_kv, tq=tq, tk=tk, head_dim=d, group=g,
                        allow_tf32=cfg.allow_tf32),
      grid=(skv // tk, b * hkv),
      in_specs=[pl.BlockSpec((None, bmap.max_q), lambda i, j: (i // sub_kv, 0)),
                pl.BlockSpec((None, n_cols), lambda i, j: (i // sub_kv, 0)),
                q_all, kv_spec, kv_spec, q_all, rows_all, rows_all] + mask_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct((b, skv, hkv, dpad), k.dtype),
                 jax.ShapeDtypeStruct((b, skv, hkv, dpad), v.dtype)],
      compiler_params=params, interpret=interpret, name="sparse_attention_dkv",
  )(jnp.asarray(bmap.q_ids), _counts_array(bmap.q_counts, bmap.q_full_counts, bmap.q_group_ends), qp, kp, vp, dop,
    lse, delta, *mask_arrays)
  return dq[..., :d], dk[..., :d], dv[..., :d]
