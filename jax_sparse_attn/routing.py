"""Content-routed block selection (MoBA, SeerAttention-style gates): which KV blocks each
query block of each head visits, chosen at run time inside `jax.jit`.

`attention(q, k, v, mask, block_selection=sel)` attends to the pairs the static ``mask``
allows whose key block ``sel`` selects for the query's block and head. The selection itself
is not differentiated (gradients flow to q, k, v through the attention only).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass, data_fields=["ids"],
                   meta_fields=["block_size"])
@dataclasses.dataclass(frozen=True)
class BlockSelection:
  """ids: int32 [batch, heads, num_q_blocks, k] KV block ids per query block and head (-1:
  none; repeats allowed); block_size: tokens per block, on both sides."""
  ids: Any
  block_size: int


def _check_block_size(block_size):
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or (
      block_size & (block_size - 1)):
    raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def _visible(num_q_blocks: int, num_kv_blocks: int, causal: bool):
  """[nq, nk] bool: the blocks a query block may select (causal: up to its own)."""
  if not causal:
    return jnp.ones((num_q_blocks, num_kv_blocks), bool)
  return jnp.arange(num_kv_blocks)[None, :] <= jnp.arange(num_q_blocks)[:, None]


def _zigzag_blocks(num_blocks: int, shards: int):
  """The block order of `context_parallel.to_zigzag` over `shards` devices (its chunks whole
  blocks): position i of the zigzag order holds natural block ``perm[i]``."""
  from .context_parallel import zigzag_permutation
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
    raise ValueError(f"zigzag_shards must be a positive int, got {shards!r}")
  if num_blocks % (2 * shards):
    raise ValueError(f"zigzag_shards={shards}: the zigzag layout's 2 x {shards} chunks must "
                     f"be whole blocks, got {num_blocks} blocks")
  return zigzag_permutation(num_blocks, shards)


def _in_zigzag_order(fn, scores, zigzag_shards):
  """Run a selection rule on block scores given in the zigzag order of both axes: scores
  reordered to the sequence's order (the causal, local and sink rules hold there), ids
  returned as sequence block numbers, rows in the zigzag order of the queries."""
  q_perm = _zigzag_blocks(scores.shape[2], zigzag_shards)
  kv_perm = _zigzag_blocks(scores.shape[3], zigzag_shards)
  natural = scores[:, :, np.argsort(q_perm)][:, :, :, np.argsort(kv_perm)]
  sel = fn(natural)
  return BlockSelection(sel.ids[:, :, q_perm], sel.block_size)


def select(scores, block_size: int, top_k: int, *, causal: bool = False,
           local_blocks: int = 0, sink_blocks: int = 0, top_fraction: float | None = None,
           zigzag_shards: int | None = None) -> BlockSelection:
  """Top-k selection from block scores [batch, heads, num_q_blocks, num_kv_blocks] (a gate's
  output, or `pooled_scores`). Always visits the ``local_blocks`` blocks ending at the query's
  own block (causal; centred on it otherwise) and the first ``sink_blocks`` blocks, then the
  ``top_k`` best of the rest; with ``causal`` only blocks up to the query's own. Ties and
  blocks with score -inf are never chosen over visible ones; rows with fewer candidates
  than top_k pad with -1. ``top_fraction``: each row chooses at most
  ``ceil(top_fraction * its visible blocks)`` (``top_k`` stays the rows' static width), e.g.
  1/8 of what each causal row can see. ``zigzag_shards=n``: the scores' blocks (both axes)
  are in `context_parallel.to_zigzag` order over n devices, as the activations of a model
  trained with ``context_layout="zigzag"``; the rules apply in sequence order, ids are
  sequence block numbers and rows follow the queries' zigzag order (what `attention` with
  that layout takes)."""
  if zigzag_shards is not None:
    return _in_zigzag_order(functools.partial(
        select, block_size=block_size, top_k=top_k, causal=causal, local_blocks=local_blocks,
        sink_blocks=sink_blocks, top_fraction=top_fraction), scores, zigzag_shards)
  _check_block_size(block_size)
  if top_fraction is not None and not 0 < top_fraction <= 1:
    raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")
  for name, x in (("top_k", top_k), ("local_blocks", local_blocks),
                  ("sink_blocks", sink_blocks)):
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
      raise ValueError(f"{name} must be a non-negative int, got {x!r}")
  if not hasattr(scores, "ndim") or scores.ndim != 4:
    raise ValueError(f"scores must be [batch, heads, num_q_blocks, num_kv_blocks], got "
                     f"{getattr(scores, 'shape', None)}")
  b, h, nq, nk = scores.shape
  qi = jnp.arange(nq)[:, None]
  kj = jnp.arange(nk)[None, :]
  allowed = _visible(nq, nk, causal)
  if causal:
    local = (kj <= qi) & (kj > qi - local_blocks)
  else:
    local = jnp.abs(kj - qi) <= (local_blocks - 1) // 2 if local_blocks else jnp.zeros_like(allowed)
  forced = (local | (kj < sink_blocks)) & allowed
  n_forced = min(nk, local_blocks + sink_blocks)
  # Each row's forced ids, smallest first (`block_map.from_selection` sorts and drops repeats).
  if n_forced:
    forced_ids = -jax.lax.top_k(-jnp.where(forced, kj, nk).astype(jnp.int32), n_forced)[0]
    forced_ids = jnp.where(forced_ids < nk, forced_ids, -1)
  else:
    forced_ids = jnp.zeros((nq, 0), jnp.int32)
  cand = jnp.where(allowed & ~forced, scores.astype(jnp.float32), -jnp.inf)
  k = min(top_k, nk)
  if k:
    vals, top = jax.lax.top_k(cand, k)
    keep = vals > -jnp.inf
    if top_fraction is not None:
      limit = jnp.ceil(top_fraction * allowed.sum(-1)).astype(jnp.int32)  # [nq]
      keep &= jnp.arange(k) < limit[:, None]
    top = jnp.where(keep, top, -1).astype(jnp.int32)
  else:
    top = jnp.zeros((b, h, nq, 0), jnp.int32)
  ids = jnp.concatenate([jnp.broadcast_to(forced_ids, (b, h, nq, n_forced)), top], axis=-1)
  return BlockSelection(jax.lax.stop_gradient(ids), block_size)


def select_mass(scores, block_size: int, threshold: float, max_blocks: int, *,
                causal: bool = False, local_blocks: int = 0, sink_blocks: int = 0,
                temperature: float = 1.0, zigzag_shards: int | None = None) -> BlockSelection:
  """VMoBA-style selection by cumulative score: per query block and head, the fewest
  best-scoring blocks whose softmax mass (over the visible blocks, ``scores / temperature``)
  reaches ``threshold`` (0 < threshold <= 1), at most ``max_blocks`` of them (the static
  bound of the map's rows: more are cut, lowest scores first), plus the forced local and sink
  blocks as in `select` (``zigzag_shards`` too)."""
  if zigzag_shards is not None:
    return _in_zigzag_order(functools.partial(
        select_mass, block_size=block_size, threshold=threshold, max_blocks=max_blocks,
        causal=causal, local_blocks=local_blocks, sink_blocks=sink_blocks,
        temperature=temperature), scores, zigzag_shards)
  if not 0 < threshold <= 1:
    raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}")
  base = select(scores, block_size, max_blocks, causal=causal, local_blocks=local_blocks,
                sink_blocks=sink_blocks)
  b, h, nq, nk = scores.shape
  n_forced = min(nk, local_blocks + sink_blocks)
  forced, top = base.ids[..., :n_forced], base.ids[..., n_forced:]
  logits = jnp.where(_visible(nq, nk, causal), scores.astype(jnp.float32) / temperature,
                     -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  mass = jnp.take_along_axis(probs, jnp.maximum(top, 0), axis=-1) * (top >= 0)
  before = jnp.cumsum(mass, axis=-1) - mass  # mass of the better blocks
  keep = (top >= 0) & (before < threshold)
  ids = jnp.concatenate([forced, jnp.where(keep, top, -1)], axis=-1)
  return BlockSelection(jax.lax.stop_gradient(ids), block_size)


def pooled_scores(query, key, block_size: int, *, shared_by_group: bool = False):
  """MoBA's block scores: each query block's mean query against each key block's mean key,
  per head (keys of a GQA group shared): [batch, heads, num_q_blocks, num_kv_blocks] float32.
  query [batch, seq_q, heads, d], key [batch, seq_kv, kv_heads, d]; padding is not averaged.
  ``shared_by_group``: one score per KV head, the mean over its query heads' scores
  ([batch, kv_heads, ...]), so that a selection from them is shared by the GQA group (NSA's
  group-centric selection: the group's heads visit the same blocks)."""
  _check_block_size(block_size)
  if not isinstance(shared_by_group, bool):
    raise ValueError(f"shared_by_group must be a bool, got {shared_by_group!r}")

  def pool(x):
    b, s, h, d = x.shape
    n = -(-s // block_size)
    x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, n * block_size - s), (0, 0), (0, 0)])
    count = jnp.minimum(block_size, s - jnp.arange(n) * block_size).astype(jnp.float32)
    return x.reshape(b, n, block_size, h, d).sum(2) / count[None, :, None, None]

  from .ops import _check_qkv
  _check_qkv(query, key, key, None)  # attention's rules: ranks, batch, head_dim, GQA groups
  qp, kp = pool(jax.lax.stop_gradient(query)), pool(jax.lax.stop_gradient(key))
  g = query.shape[2] // key.shape[2]
  if shared_by_group:  # the mean of the group's scores is its mean query's score
    b, n, h, d = qp.shape
    qp = qp.reshape(b, n, h // g, g, d).mean(3)
  else:
    kp = jnp.repeat(kp, g, axis=2)
  return jnp.einsum("bqhd,bkhd->bhqk", qp, kp, precision=jax.lax.Precision.HIGHEST)


def topk_blocks(query, key, block_size: int, top_k: int, *, causal: bool = False,
                local_blocks: int = 0, sink_blocks: int = 0,
                zigzag_shards: int | None = None,
                shared_by_group: bool = False) -> BlockSelection:
  """MoBA: `select` on `pooled_scores` (e.g. ``topk_blocks(q, k, 128, 32, causal=True,
  local_blocks=2)``: the diagonal and previous block plus the 32 best earlier blocks).
  ``zigzag_shards=n``: q and k are in `context_parallel.to_zigzag` order over n devices
  (see `select`). ``shared_by_group``: one selection per KV head from its query heads' mean
  score, which `attention` gives every query head of the group (NSA)."""
  return select(pooled_scores(query, key, block_size, shared_by_group=shared_by_group),
                block_size, top_k, causal=causal, local_blocks=local_blocks,
                sink_blocks=sink_blocks, zigzag_shards=zigzag_shards)


def tile_order(spatial_shape, tile_shape):
  """N-D block partitions (VMoBA's 2-D/3-D blocks): a `layout.TiledLayout` whose tiles are
  the blocks. ``t = tile_order((16, 64, 64), (2, 8, 8))``; ``t.to_kernel(x)`` turns
  ``[batch, *spatial, ...]`` into ``[batch, t.padded_len, ...]`` with every block of
  ``prod(tile_shape)`` tokens contiguous (grid padded to whole tiles), ``t.from_kernel``
  back. Route and attend in that order with ``block_size = prod(tile_shape)``; padded tokens
  are real rows there (zeros): give them their own segment id (`tile_valid`)."""
  from .layout import TiledLayout
  spatial_shape, tile_shape = tuple(spatial_shape), tuple(tile_shape)
  if len(spatial_shape) != len(tile_shape) or not all(t > 0 for t in tile_shape):
    raise ValueError(f"tile_shape {tile_shape} must have one positive entry per dim of "
                     f"{spatial_shape}")
  _check_block_size(math.prod(tile_shape))
  return TiledLayout(spatial_shape, (1,) * len(spatial_shape), tile_shape)


def tile_valid(layout):
  """[padded_len] bool: which positions of `tile_order`'s order are real tokens."""
  return jnp.asarray(layout.token_index()[1])
