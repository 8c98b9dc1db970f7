"""Exact merge of partial attentions by log-sum-exp.

Attention over a key set that is the disjoint union of parts equals the parts' outputs
weighted by ``exp(lse_part - lse_total)``. Ring attention merges one KV shard per step with
it; extra tokens beside a neighborhood are a second part.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def merge_attentions(outputs: Sequence, lses: Sequence, out_dtype=None):
  """Merge attentions over disjoint key sets into attention over their union.

  Args:
    outputs: one or more ``[..., heads, head_dim]`` arrays (zeros where a part saw no key).
    lses: their log-sum-exps ``[..., heads]`` (float32; ``-inf`` where a part saw no key),
      as returned with ``return_lse=True``.
    out_dtype: dtype of the merged output (default: the first output's).

  Returns:
    ``(out, lse)``: out ``[..., heads, head_dim]``, lse ``[..., heads]`` float32. Rows that no
    part saw are zeros with lse ``-inf`` (never NaN, in values or gradients).
    Differentiable in every output and lse.
  """
  if len(outputs) != len(lses) or not outputs:
    raise ValueError(f"outputs and lses must be non-empty sequences of the same length, got "
                     f"{len(outputs)} and {len(lses)}")
  for i, (o, l) in enumerate(zip(outputs, lses)):
    if o.shape[:-1] != l.shape or o.shape != outputs[0].shape:
      raise ValueError(f"outputs[{i}] {o.shape} and lses[{i}] {l.shape} must be "
                       f"[..., heads, head_dim] and [..., heads] like outputs[0] "
                       f"{outputs[0].shape}")
  out_dtype = out_dtype or outputs[0].dtype
  lse = jnp.stack([l.astype(jnp.float32) for l in lses])
  # The result does not depend on the shift (its derivative cancels): no gradient through it.
  shift = jax.lax.stop_gradient(jnp.max(lse, axis=0))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  weights = jnp.exp(lse - shift)  # exp(-inf) = 0: parts that saw nothing weigh nothing
  total = jnp.sum(weights, axis=0)
  seen = total > 0
  safe_total = jnp.where(seen, total, 1.0)
  out = sum(w[..., None] * o.astype(jnp.float32) for w, o in zip(weights, outputs))
  out = out / safe_total[..., None]
  merged_lse = jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)
  return out.astype(out_dtype), merged_lse


def join_sink(lse, sink, seen, exp=jnp.exp, log=jnp.log):
  """A learned sink logit joined to rows' softmax, as kernels do in their epilogue:
  ``(lse ⊕ sink, share)`` where ``share = exp(lse - lse ⊕ sink)`` scales the rows' output
  (the weight of their keys against the sink's zero value vector).

  In the kernel's units: `exp`/`log` base e, or base 2 with lse and sink in log2 units.
  `seen`: rows that saw a key (lse finite); the others get lse = sink and share 0 (never
  NaN, a sink of -inf included)."""
  top = jnp.maximum(lse, sink)
  joined = top + log(exp(lse - top) + exp(sink - top))
  return jnp.where(seen, joined, sink), jnp.where(seen, exp(lse - joined), 0.0)
