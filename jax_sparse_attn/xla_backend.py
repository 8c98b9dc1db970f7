"""The XLA backend: block-sparse flash attention in plain JAX.

Runs on every device (the CPU default). It walks the block map: step ``t`` gathers, for every
Q block at once, the ``t``-th KV block it visits, and folds it into an online softmax. Memory
is O(seq * block) per step and O(seq * window) overall; no N x N tensor is formed. The
backward pass recomputes probabilities block by block (dQ in place, dK/dV by scatter-add
into the visited KV blocks). A runtime block map (content-routed attention) walks ids per
(batch, head) the same way.

Arrays are in kernel order and padded (see `plan.AttentionPlan`):
q [batch, padded_q, heads, head_dim]; k, v [batch, padded_kv, kv_heads, head_dim];
segment ids [batch, padded] int32 or None; lse [batch, heads, padded_q] float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .backends import backward_delta
from .merge import join_sink
from .plan import AttentionPlan, element_mask
from .softcap import capped, slope

_HI = jax.lax.Precision.HIGHEST


def _split(q, k, plan: AttentionPlan):
  b, sq, h, d = q.shape
  hkv = k.shape[2]
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = sq // bq, k.shape[1] // bk
  return b, h, hkv, h // hkv, d, bq, bk, nq, nk


def _step_mask(plan: AttentionPlan, t, q_seg, kv_seg):
  """[batch|1, nq, bq, bk] mask for the t-th visited KV block of every Q block."""
  bmap = plan.block_map
  nq, bq, bk = bmap.num_q_blocks, plan.block_q, plan.block_kv
  kv_ids = jnp.asarray(bmap.kv_ids)[:, t]
  valid = t < jnp.asarray(bmap.kv_counts)
  q_pos = jnp.arange(nq * bq).reshape(nq, bq)
  kv_pos = kv_ids[:, None] * bk + jnp.arange(bk)[None, :]
  m = element_mask(plan, q_pos[:, :, None], kv_pos[:, None, :], jnp)
  m = (m & valid[:, None, None])[None]
  if q_seg is not None:
    qs = q_seg.reshape(-1, nq, bq)
    ks = kv_seg.reshape(kv_seg.shape[0], -1, bk)[:, kv_ids]
    m = m & (qs[:, :, :, None] == ks[:, :, None, :])
  return kv_ids, m


def _scores(qb, kb, m, scale, cap):
  # qb [b, nq, bq, hkv, g, d], kb [b, nq, bk, hkv, d] -> s [b, nq, hkv, g, bq, bk]
  s = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, kb, preferred_element_type=jnp.float32,
                 precision=_HI) * scale
  return jnp.where(m[:, :, None, None], capped(s, cap), -jnp.inf)


# Runtime block maps (`block_map.from_selection`): ids per (batch, head).


def _runtime_step(plan: AttentionPlan, bmap, t, q_seg, kv_seg, kv_heads: int):
  """(ids [b, hkv, g, nq], mask [b, nq, hkv, g, bq, bk]) of every Q block's t-th entry."""
  b, h, nq = bmap.kv_counts.shape
  g, bq, bk = h // kv_heads, plan.block_q, plan.block_kv
  ids = bmap.kv_ids[..., t].reshape(b, kv_heads, g, nq)
  valid = (t < bmap.kv_counts).reshape(b, kv_heads, g, nq)
  q_pos = jnp.arange(nq * bq).reshape(nq, bq)[:, :, None]
  kv_pos = (ids[..., None] * bk + jnp.arange(bk))[..., None, :]  # [b, hkv, g, nq, 1, bk]
  m = element_mask(plan, q_pos, kv_pos, jnp) & valid[..., None, None]
  if q_seg is not None:
    qs = q_seg.reshape(b, 1, 1, nq, bq, 1)
    ks = kv_seg.reshape(b, -1, bk)[jnp.arange(b)[:, None, None, None], ids][..., None, :]
    m = m & (qs == ks)
  return ids, m.transpose(0, 3, 1, 2, 4, 5)


def _gather(blocks, ids):
  """blocks [b, nk, bk, hkv, d], ids [b, hkv, g, nq] -> [b, hkv, g, nq, bk, d]."""
  b, hkv = blocks.shape[0], blocks.shape[3]
  return blocks[jnp.arange(b)[:, None, None, None], ids, :, jnp.arange(hkv)[None, :, None, None]]


def _steps(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, bmap, cap=None):
  """The map walk both passes share: (qb, kb_all, vb_all, blocks, kv, num_steps), where
  ``blocks(t) -> (masked scores [b, nq, hkv, g, bq, bk], K blocks, V blocks, their index
  into kb_all)`` for every Q block's t-th entry of the plan's map (``bmap`` None: one id per
  Q block, K/V blocks [b, nq, bk, hkv, d]) or of a runtime map (ids per batch and head,
  K/V blocks [b, hkv, g, nq, bk, d]); `kv`: the K/V blocks' einsum subscripts. `cap`: the
  scores soft-capped (`softcap.capped`) before the mask."""
  b, h, hkv, g, d, bq, bk, nq, nk = _split(q, k, plan)
  qb = q.reshape(b, nq, bq, hkv, g, d)
  kb_all = k.reshape(b, nk, bk, hkv, d)
  vb_all = v.reshape(b, nk, bk, hkv, d)
  if bmap is None:
    def blocks(t):
      kv_ids, m = _step_mask(plan, t, q_seg, kv_seg)
      kb, vb = kb_all[:, kv_ids], vb_all[:, kv_ids]
      return _scores(qb, kb, m, scale, cap), kb, vb, (slice(None), kv_ids)
    return qb, kb_all, vb_all, blocks, "bnkhd", plan.block_map.max_kv
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(hkv)[None, :, None, None]

  def blocks(t):
    ids, m = _runtime_step(plan, bmap, t, q_seg, kv_seg, hkv)
    kb, vb = _gather(kb_all, ids), _gather(vb_all, ids)
    s = jnp.einsum("bnqhgd,bhgnkd->bnhgqk", qb, kb, preferred_element_type=jnp.float32,
                   precision=_HI) * scale
    return jnp.where(m, capped(s, cap), -jnp.inf), kb, vb, (bi, ids, slice(None), hi)
  return qb, kb_all, vb_all, blocks, "bhgnkd", bmap.max_kv


def forward(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, block_map=None,
            sinks=None, softcap=None):
  """Online softmax over the plan's map, or over `block_map` (a runtime map) if given.
  Returns out [b, sq, h, d] (zeros where a row saw nothing) and lse [b, h, sq]. `sinks`:
  learned sink logits [h] float32 joined to every row's softmax (`merge.join_sink`);
  `softcap`: the logits soft-capped (`softcap.capped`)."""
  b, sq, h, d = q.shape
  hkv = k.shape[2]
  g, bq = h // hkv, plan.block_q
  nq = sq // bq
  _, _, _, blocks, kv, num_steps = _steps(q, k, v, q_seg, kv_seg, plan, scale, block_map,
                                          softcap)

  def step(carry, t):
    m_prev, l_prev, acc = carry
    s, _, vb, _ = blocks(t)
    m_new = jnp.maximum(m_prev, s.max(-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m_prev - m_safe)
    pv = jnp.einsum(f"bnhgqk,{kv}->bnhgqd", p.astype(vb.dtype), vb,
                    preferred_element_type=jnp.float32, precision=_HI)
    return (m_new, alpha * l_prev + p.sum(-1), alpha[..., None] * acc + pv), None

  shape = (b, nq, hkv, g, bq)
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape + (d,), jnp.float32))
  (m_fin, l_fin, acc), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
  seen = l_fin > 0
  out = acc / jnp.where(seen, l_fin, 1.0)[..., None]
  lse = jnp.where(seen, m_fin + jnp.log(jnp.where(seen, l_fin, 1.0)), -jnp.inf)
  if sinks is not None:  # [h] as [hkv, g, 1] against [b, nq, hkv, g, bq]
    lse, share = join_sink(lse, sinks.astype(jnp.float32).reshape(hkv, g, 1), seen)
    out = out * share[..., None]
  out = out.transpose(0, 1, 4, 2, 3, 5).reshape(b, nq * bq, h, d).astype(q.dtype)
  return out, lse.transpose(0, 2, 3, 1, 4).reshape(b, h, nq * bq)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan: AttentionPlan, scale: float,
             block_map=None, softcap=None):
  """dq, dk, dv over the map `forward` walked: probabilities recomputed per step, dQ in
  place, dK/dV scatter-added into the visited blocks."""
  b, h, hkv, g, d, bq, bk, nq, nk = _split(q, k, plan)
  qb, kb_all, vb_all, blocks, kv, num_steps = _steps(q, k, v, q_seg, kv_seg, plan, scale,
                                                     block_map, softcap)
  dob = d_out.reshape(b, nq, bq, hkv, g, d)
  # delta = rowsum(dO * O) - dLSE  (the lse cotangent folds into the same term).
  delta = backward_delta(out, d_out, d_lse)  # [b, h, sq]
  delta = delta.reshape(b, hkv, g, nq, bq).transpose(0, 3, 1, 2, 4)
  lse_b = lse.reshape(b, hkv, g, nq, bq).transpose(0, 3, 1, 2, 4)
  lse_safe = jnp.where(jnp.isneginf(lse_b), jnp.inf, lse_b)
  dot = lambda spec, x, y: jnp.einsum(spec, x, y, preferred_element_type=jnp.float32,
                                      precision=_HI)

  def step(carry, t):
    dq, dk, dv = carry
    s, kb, vb, index = blocks(t)
    p = jnp.exp(s - lse_safe[..., None])
    dv_blk = dot(f"bnhgqk,bnqhgd->{kv}", p.astype(d_out.dtype), dob)
    ds = p * (dot(f"bnqhgd,{kv}->bnhgqk", dob, vb) - delta[..., None])
    if softcap is not None:  # through the cap: dS of the capped score times its slope
      ds = ds * slope(s, softcap)
    dq = dq + dot(f"bnhgqk,{kv}->bnqhgd", ds.astype(k.dtype), kb)
    dk_blk = dot(f"bnhgqk,bnqhgd->{kv}", ds.astype(q.dtype), qb)
    return (dq, dk.at[index].add(dk_blk), dv.at[index].add(dv_blk)), None

  init = (jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kb_all.shape, jnp.float32),
          jnp.zeros(vb_all.shape, jnp.float32))
  (dq, dk, dv), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
  dq = (dq * scale).reshape(q.shape).astype(q.dtype)
  dk = (dk * scale).reshape(k.shape).astype(k.dtype)
  return dq, dk, dv.reshape(v.shape).astype(v.dtype)
