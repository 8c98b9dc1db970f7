"""`jax.nn.dot_product_attention`'s signature on this package's kernels: code written against
jax's function switches by changing the import, and its causal, window and padding arguments
become block-sparse masks (blocks nobody sees are skipped, not masked)."""
from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from . import masks as masks_lib
from .ops import attention


def _window(local_window_size) -> masks_lib.Mask:
  """jax's ``local_window_size``: an int w (w keys each side) or (left, right)."""
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
    left = right = int(local_window_size)
  elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                for w in local_window_size)):
    left, right = (int(w) for w in local_window_size)
  else:
    raise ValueError("local_window_size must be an int or a (left, right) pair of ints, got "
                     f"{local_window_size!r}")
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size must be non-negative, got {local_window_size!r}")
  return masks_lib.sliding_window(left, right)


def _array_mask(mask, seq_q: int, seq_kv: int) -> masks_lib.Mask:
  """jax's boolean ``mask`` (broadcastable to [batch, heads, T, S]) as `masks.from_array`:
  only one [T, S] pattern shared by every batch row and head, known at trace time."""
  try:
    arr = np.asarray(mask)
  except jax.errors.TracerArrayConversionError as e:  # no block map from a traced array
    raise ValueError("mask must be a concrete boolean array (a block map is built from it "
                     "at trace time); for masks computed inside jit use `masks` specs or "
                     "segment ids") from e
  if arr.dtype != np.bool_:
    raise ValueError(f"mask must be boolean, got {arr.dtype}")
  if not 2 <= arr.ndim <= 4 or any(n != 1 for n in arr.shape[:-2]):
    raise ValueError("mask must be one [T, S] pattern for every batch row and head (shape "
                     f"[T, S] or [1, 1, T, S]), got shape {arr.shape}")
  try:
    arr = np.broadcast_to(arr.reshape(arr.shape[-2:]), (seq_q, seq_kv))
  except ValueError as e:
    raise ValueError(f"mask must broadcast to [T, S] = {(seq_q, seq_kv)}, got shape "
                     f"{arr.shape}") from e
  return masks_lib.from_array(np.ascontiguousarray(arr))


def _lengths(lengths, name: str, batch: int):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape ({batch},), got "
                     f"{lengths.shape} {lengths.dtype}")
  return lengths


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal: bool = False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual: bool = False,
                          backend: str = "auto", **kwargs):
  """`jax.nn.dot_product_attention` on this package's kernels: the same arguments and layout
  (query [B, T, N, H], key/value [B, S, K, H] with N % K == 0, or the three without B), the
  same results.

  ``is_causal`` (top-left aligned, as jax's) and ``local_window_size`` (an int w: w keys on
  each side; (left, right): keys ``i - left .. i + right``) become `masks.causal()` and
  `masks.sliding_window`, so the kernels skip the blocks they exclude. ``query_seq_lengths``
  / ``key_value_seq_lengths`` ([B] int) become segment ids: keys past a row's length are not
  seen, queries past it output zeros (as jax's). ``mask``: a concrete boolean [T, S] (or
  [1, 1, T, S]) pattern, `masks.from_array` (rows of one run of keys each run on every
  kernel backend as row bounds, other patterns on `xla`; a per-row or traced mask is a
  ValueError). ``bias`` is not supported (a dense [B, N, T, S] addend defeats the block
  sparsity): use jax's function for it. ``implementation``: None (this package's ``backend``,
  "auto" by default) or "xla" (``backend="xla"``); "cudnn" is a ValueError (call jax's
  function for cuDNN). ``return_residual``: also the log-sum-exp [B, T, N] in the key's dtype
  (-inf where a row sees no key; jax's is finite there). Rows that see no key are zeros
  (jax's XLA implementation averages every value there, except past
  ``query_seq_lengths``). Other keyword arguments go to `attention` (``sinks``,
  ``segment_ids``, ``mesh``, ``logits_soft_cap``, ...).
  """
  if bias is not None:
    raise ValueError("bias is not supported: a dense [batch, heads, T, S] addend defeats "
                     "block sparsity; use jax.nn.dot_product_attention, or express it as a "
                     "mask (jax_sparse_attn.masks)")
  if implementation not in (None, "xla"):
    raise ValueError(f"implementation must be None or 'xla' here, got {implementation!r} "
                     "(call jax.nn.dot_product_attention for cuDNN; this package picks its "
                     "kernels with backend=)")
  if implementation == "xla":
    backend = "xla"
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
  ndims = {getattr(x, "ndim", None) for x in (query, key, value)}
  if ndims not in ({4}, {3}):
    raise ValueError("query, key and value must all be [batch, seq, heads, head_dim] or all "
                     "[seq, heads, head_dim], got shapes "
                     f"{[getattr(x, 'shape', None) for x in (query, key, value)]}")
  if ndims == {3}:  # jax's TNH form: one batch row
    result = dot_product_attention(
        query[None], key[None], value[None], bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation=implementation,
        return_residual=return_residual, backend=backend, **kwargs)
    return tuple(x[0] for x in result) if return_residual else result[0]
  b, t = query.shape[:2]
  s = key.shape[1]
  parts = (([masks_lib.causal()] if is_causal else [])
           + ([_window(local_window_size)] if local_window_size is not None else [])
           + ([_array_mask(mask, t, s)] if mask is not None else []))
  spec = functools.reduce(operator.and_, parts) if parts else None
  q_len = _lengths(query_seq_lengths, "query_seq_lengths", b)
  kv_len = _lengths(key_value_seq_lengths, "key_value_seq_lengths", b)
  if q_len is not None or kv_len is not None:
    if kwargs.get("segment_ids") is not None:
      raise ValueError("segment_ids cannot be combined with query_seq_lengths / "
                       "key_value_seq_lengths (both are segment ids)")
    # Equal ids attend: valid tokens 0; padded queries -1 and padded keys -2 see nothing.
    ids = lambda lengths, n, pad: (jnp.zeros((b, n), jnp.int32) if lengths is None else
                                   jnp.where(jnp.arange(n)[None, :] < lengths[:, None], 0,
                                             pad).astype(jnp.int32))
    kwargs["segment_ids"] = (ids(q_len, t, -1), ids(kv_len, s, -2))
  result = attention(query, key, value, spec, scale=scale, backend=backend,
                     return_lse=return_residual, **kwargs)
  if return_residual:
    out, lse = result
    return out, lse.astype(key.dtype)
  return result
