"""Float64 brute force of the semantics, written independently of the package (loops)."""
from __future__ import annotations

import itertools

import numpy as np


def gna_keys_1d(q: int, length: int, kernel: int, stride: int, dilation: int, causal: bool):
  """Keys visible to query coordinate `q` along one dimension (NATTEN's GNA definition)."""
  group = q % dilation
  members = list(range(group, length, dilation))  # the dilation group, in order
  glen = len(members)
  y = q // dilation
  first = (y // stride) * stride
  if causal:
    leader = min(first + stride - 1, glen - 1)
    keep = [j for j in range(glen) if j <= y and j > leader - kernel]
  else:
    leader = min(first + stride // 2, glen - 1)
    start = leader - kernel // 2
    start = max(0, min(start, glen - kernel))
    keep = list(range(start, start + kernel))
  return {members[j] for j in keep}


def gna_mask(spatial, kernel, stride, dilation, causal) -> np.ndarray:
  """Dense [N, N] boolean mask over the row-major flattened grid."""
  n = int(np.prod(spatial))
  per_dim = []
  for dim, length in enumerate(spatial):
    m = np.zeros((length, length), bool)
    for x in range(length):
      for kv in gna_keys_1d(x, length, kernel[dim], stride[dim], dilation[dim], causal[dim]):
        m[x, kv] = True
    per_dim.append(m)
  coords = list(itertools.product(*[range(s) for s in spatial]))
  out = np.ones((n, n), bool)
  for dim in range(len(spatial)):
    c = np.array([cc[dim] for cc in coords])
    out &= per_dim[dim][c[:, None], c[None, :]]
  return out


def _repeat_kv(q, x):
  return np.repeat(x, q.shape[2] // x.shape[2], axis=2)


def _probs(q, k, mask, scale, q_seg, kv_seg, cap=None):
  """Softmax probabilities [b, h, sq, skv] (zero rows where nothing is visible), the
  denominators and row maxima (for the LSE); ``cap``: scores soft-capped, cap·tanh(s / cap)."""
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if cap is not None:
    s = cap * np.tanh(s / cap)
  mask = np.asarray(mask)  # [sq, skv], [batch, sq, skv] or [batch, heads, sq, skv]
  m = np.broadcast_to({2: mask[None, None], 3: mask[:, None], 4: mask}[mask.ndim],
                      s.shape).copy()
  if q_seg is not None:
    m &= (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
  s = np.where(m, s, -np.inf)
  mx = s.max(-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0.0)
  p = np.where(m, np.exp(s - mx), 0.0)
  den = p.sum(-1, keepdims=True)
  return p / np.where(den == 0, 1, den), den, mx


def attention(q, k, v, mask, scale, q_seg=None, kv_seg=None, cap=None):
  """q [b, sq, h, d], k/v [b, skv, hkv, d], mask [sq, skv], [b, sq, skv] or [b, h, sq, skv]
  -> (out, lse [b, sq, h]) float64; ``cap``: soft-capped scores."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = _repeat_kv(q, k), _repeat_kv(q, v)
  p, den, mx = _probs(q, k, mask, scale, q_seg, kv_seg, cap)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  with np.errstate(divide="ignore"):
    lse = np.where(den[..., 0] > 0, np.log(den[..., 0]) + mx[..., 0], -np.inf)
  return out, lse.transpose(0, 2, 1)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert not np.any(np.isnan(a)), "NaN in result"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_grads(q, k, v, mask, scale, d_out, q_seg=None, kv_seg=None, cap=None,
                    magnitudes=False):
  """Float64 gradients of sum(out * d_out) w.r.t. q, k, v (GQA summed over the group);
  ``cap``: soft-capped scores (dS times the cap's slope 1 - tanh²). ``magnitudes``: also
  their error floors (`_grads`), as ((dq, dk, dv), (floor of dq, of dk, of dv))."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  kr, vr = _repeat_kv(q, k), _repeat_kv(q, v)
  p, _, _ = _probs(q, kr, mask, scale, q_seg, kv_seg, cap)
  dp = np.einsum("bqhd,bkhd->bhqk", d_out, vr)
  slope = None
  if cap is not None:
    slope = 1 - np.tanh(np.einsum("bqhd,bkhd->bhqk", q, kr) * scale / cap) ** 2
  grads, floors, _, _ = _grads(p, dp, q, kr, vr, d_out, scale, k.shape[2], slope)
  return (grads, floors) if magnitudes else grads


def _grads(p, dp, q, kr, vr, d_out, scale, kv_heads, slope=None):
  """dQ, dK, dV (GQA summed) from P and dP [b, h, sq, skv]; their error floors (L2 norms)
  from the rowsum rowsum(dP ∘ P) = rowsum(dO ∘ O) per unit of a dtype's roundoff: a flash
  backward takes the rowsum from its stored output (O and P rounded), which moves each row's
  rowsum by up to that unit times its products Σ_d |dO| · Σ_k P |V|, and dS = P ∘ (dP −
  rowsum) by P times that, coherently along the row (dQ's floor) and independently across
  rows (dK's, summed in quadrature; dV does not read the rowsum); the rowsum [b, h, sq, 1]
  and its products."""
  b, sq, h, d = q.shape
  delta = (dp * p).sum(-1, keepdims=True)
  products = np.einsum("bqhd,bhqk,bkhd->bhq", np.abs(d_out), p, np.abs(vr))[..., None]
  ds = p * (dp - delta)
  ps = p if slope is None else p * slope  # dS's factor on a rowsum error
  if slope is not None:
    ds = ds * slope
  g = h // kv_heads
  group = lambda x: x.reshape(b, -1, kv_heads, g, d).sum(3)
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
  dk = group(np.einsum("bhqk,bqhd->bkhd", ds, q) * scale)
  dv = group(np.einsum("bhqk,bqhd->bkhd", p, d_out))
  e = products[..., 0]
  floor_dq = np.linalg.norm(np.einsum("bhq,bhqk,bkhd->bqhd", e, ps, kr)) * scale
  floor_dk = np.sqrt(np.einsum("bhq,bhqk,bqh->", e ** 2, ps ** 2, (q ** 2).sum(-1))) * scale
  return (dq, dk, dv), (floor_dq, floor_dk, 0.0), delta, products


def attention_with_sinks(q, k, v, mask, scale, sinks, d_out, q_seg=None, kv_seg=None):
  """Float64 attention with a sink logit per head: one more column in every row's softmax
  (logit ``sinks[h]``, not scaled; value vector zero). Returns out, lse [b, sq, h], the
  gradients of sum(out * d_out) w.r.t. q, k, v and the sinks [h], and error scales: the
  floors of dq, dk, dv (`_grads`) and two of the sinks' gradient per head (a sum that cancels), the
  magnitude of its terms p_sink · |rowsum(dO ∘ O)| and of the products inside each rowsum,
  p_sink · Σ_d |dO| · Σ_k P |V|."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  b, sq, h, d = q.shape
  skv = k.shape[1]
  kr, vr = _repeat_kv(q, k), _repeat_kv(q, v)
  s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
  mask = np.asarray(mask)
  m = np.broadcast_to({2: mask[None, None], 3: mask[:, None], 4: mask}[mask.ndim], s.shape).copy()
  if q_seg is not None:
    m &= (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
  sink = np.broadcast_to(np.asarray(sinks, np.float64), (h,))
  s = np.concatenate([np.where(m, s, -np.inf),
                      np.broadcast_to(sink[None, :, None, None], (b, h, sq, 1))], axis=-1)
  mx = s.max(-1, keepdims=True)  # finite: the sink column
  e = np.exp(s - mx)
  den = e.sum(-1, keepdims=True)
  p = e / den
  out = np.einsum("bhqk,bkhd->bqhd", p[..., :skv], vr)
  lse = (np.log(den) + mx)[..., 0].transpose(0, 2, 1)
  dp = np.einsum("bqhd,bkhd->bhqk", d_out, vr)
  # The sink's column has a zero value vector: dP there is zero, and its dS is -p_sink · delta.
  (dq, dk, dv), floors, delta, products = _grads(p[..., :skv], dp, q, kr, vr, d_out, scale,
                                               k.shape[2])
  p_sink = p[..., skv:]
  d_sinks = -(p_sink * delta).sum(axis=(0, 2, 3))
  scales = dict(grads=floors, terms=np.abs(p_sink * delta).sum(axis=(0, 2, 3)),
                products=(p_sink * products).sum(axis=(0, 2, 3)))
  return out, lse, (dq, dk, dv, d_sinks), scales
