"""The reference backend: dense masked softmax in float32.

Exact and simple; memory O(batch * heads * seq_q * seq_kv), so it refuses large problems.
Every other backend is tested against it (and it against a float64 brute force).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import masks as masks_lib
from .softcap import capped

# float32 scores of batch*heads*seq_q*seq_kv above this are refused.
MAX_SCORE_ELEMENTS = 1 << 28


def attention(query, key, value, mask: masks_lib.Mask, *, scale: float, q_segment_ids=None,
              kv_segment_ids=None, softcap: float | None = None):
  """Dense masked attention.

  query: [batch, seq_q, heads, head_dim]; key/value: [batch, seq_kv, kv_heads, head_dim];
  segment ids: [batch, seq] int32 or None; `softcap`: scores capped to softcap·tanh(s /
  softcap) before the mask (`softcap.capped`). Returns (out [batch, seq_q, heads, head_dim] in
  the query dtype, lse [batch, seq_q, heads] float32, -inf on fully masked rows).
  """
  b, sq, h, d = query.shape
  skv, hkv = key.shape[1], key.shape[2]
  elements = b * h * sq * skv
  if elements > MAX_SCORE_ELEMENTS:
    raise ValueError(
        f"backend='reference' materializes batch*heads*seq_q*seq_kv = {elements} float32 "
        f"scores (limit {MAX_SCORE_ELEMENTS}); use backend='xla' or a kernel backend")
  g = h // hkv
  q = query.astype(jnp.float32).reshape(b, sq, hkv, g, d)
  k = key.astype(jnp.float32)
  v = value.astype(jnp.float32)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, precision=jax.lax.Precision.HIGHEST) * scale
  s = capped(s, softcap)
  m = mask(jnp.arange(sq)[:, None], jnp.arange(skv)[None, :])
  m = jnp.broadcast_to(m, (sq, skv))[None]
  if q_segment_ids is not None:
    m = m & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  m = m[:, None, None]
  s = jnp.where(m, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(m, jnp.exp(s - safe_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(denom == 0, 1.0, denom), v,
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0))
                  + safe_max[..., 0], -jnp.inf)
  out = out.reshape(b, sq, h, d).astype(query.dtype)
  return out, lse.reshape(b, h, sq).transpose(0, 2, 1)
