"""Work items of the Hopper backward's dK/dV kernel (`attention_bwd`, `attention_bwd_wide`).

A work item is one CTA's share: a KV block (of a KV head and batch element) and a chunk of
its Q list. Static maps get them on the host (`static_items`: one per KV block, outlier lists
cut, `cut_slots` for the cut blocks' float32 buffers); runtime (content-routed) maps on device
(`runtime_items`: chunks of every KV block's lists, or whole lists, `whole_lists`); the
kernels read an item's lists with `item_lists`. The knobs below are lab switches with their
measurements (`benchmarks/diag/diag_dkv_items.py`, `diag_sink_chunks.py`,
`diag_runtime_items.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import MosaicGPUConfig
from .schedule import _programs


MIN_CHUNK = 8  # entries of a runtime map's items (`runtime_items`), at least


def chunk_entries(mean_entries: float) -> int:
  """Entries per work item of a runtime map (and of static maps' cut lists with
  `SPLIT_OUTLIERS` off or `OUTLIER_CHUNK` "min8"): the mean Q list length, at least
  `MIN_CHUNK`."""
  return max(MIN_CHUNK, int(np.ceil(mean_entries)))


# The dK/dV work items (lab knobs, `benchmarks/diag/diag_dkv_items.py`). ITEM_ORDER "natural":
# KV-block order; "longest": longest first. SPLIT_OUTLIERS: cut Q lists only where the longest
# is more than twice the mean (a sink's), else one item per KV block (dK/dV stored in the
# input dtype, `attention_bwd.DIRECT_DKV`); False: every list longer than the mean. H200,
# backward ms (docs/experiments/h200-2026-12-03-dkv-items.json): 2-D NA k33 3.78 -> 3.30
# (Nsight Compute: L2 hit rate 19% -> 35%, DRAM reads 4.65 -> 3.08 GB), 3-D NA 15.9 -> 15.0,
# causal 13.3 -> 12.7 (direct dK/dV), window and the LM layer unchanged.
ITEM_ORDER = "natural"
SPLIT_OUTLIERS = True
# The entries of an outlier's items: "mean", the mean list length (rounded up); "min8", the
# mean, at least `MIN_CHUNK` (the form before cut every list longer than that, where a list
# was an outlier: the same items for the cases below). H200, the LM layer (GQA 16/4, D=128, S=8192,
# B=2; a sink's list of 64 entries, mean 5.8): backward 0.762-0.777 ms with 6 entries vs
# 0.795-0.810 with 8; head_dim 64 and `window 2047 | sink 64` at S=32768 within noise
# (docs/experiments/h200-2026-12-04-sink-chunks.json).
OUTLIER_CHUNK = "mean"
# The grid's last (fastest) axis: True, work items (CTAs that run at once share a head's Q
# blocks); False, batch (they are one item of every head). Pallas runs the last grid axis
# fastest. H200, backward ms with `attention_bwd_dq.Q_FASTEST` too, batch last / both
# fastest (docs/experiments/h200-2026-12-03-grid-order.json): dense S=16384 24.4 / 23.5,
# causal 12.3 / 11.9, 3-D NA 14.3 / 13.3, 2-D NA 3.08 / 3.06, the LM layer 0.87 / 0.90.
ITEMS_FASTEST = True


def static_items(counts: np.ndarray) -> np.ndarray:
  """Work items [n, 3] (KV block, first entry, entries) over the KV blocks' Q lists, in
  KV-block order (neighbouring KV blocks share Q blocks: neighborhoods, windows; causal lists
  come longest first that way): one per KV block, except lists more than twice the mean (a
  sink or global token's keys, which every query visits), cut into chunks of the mean
  (rounded up, at least 2), so that the long one does not hold the whole kernel up and its
  items are no longer than the others (`OUTLIER_CHUNK`). KV blocks no query visits get no
  item (their dK/dV stay 0)."""
  counts = np.asarray(counts, np.int64)
  visited = counts[counts > 0]
  if not visited.size:
    return np.zeros((0, 3), np.int32)
  mean = visited.mean()
  if not SPLIT_OUTLIERS:  # every list longer than the chunk cut
    chunk = chunk_entries(mean)
    step = lambda n: chunk
  else:
    chunk = max(2, int(np.ceil(mean))) if OUTLIER_CHUNK == "mean" else chunk_entries(mean)
    step = lambda n: chunk if n > 2 * mean else max(int(n), 1)
  items = [(j, s, min(step(n), int(n) - s)) for j, n in enumerate(counts)
           for s in range(0, int(n), step(n))]
  if ITEM_ORDER == "longest":
    items.sort(key=lambda it: -it[2])
  return np.asarray(items, np.int32)


# The dK/dV work items of a runtime map (content-routed): "chunks", each KV block's lists cut
# into chunks of the mean list length (`runtime_items`; dK/dV reduce-added in float32 into
# zero-filled buffers, then cast); "whole", one item per KV block with its whole lists (dK/dV
# stored in the input dtype: half the zero fill, no cast, no reduce-adds), where the longest
# possible item is short against each SM's share of the work (`whole_lists`); "auto" decides
# by that rule, "chunks" / "whole" force a form.
RUNTIME_ITEMS = "auto"
# "auto": whole lists where the longest possible item (every Q block of a KV head's group)
# has at most this share of the map's bound on steps per SM.
WHOLE_LIST_SHARE = 0.5


def whole_lists(bmap, batch: int, kv_heads: int, groups: int) -> bool:
  """Whether a runtime map's dK/dV items are whole lists (`RUNTIME_ITEMS`). Whole lists
  come in KV-block order, so under a causal mask the longest start first."""
  if RUNTIME_ITEMS != "auto":
    return RUNTIME_ITEMS == "whole"
  longest = groups * bmap.max_q
  per_sm = batch * kv_heads * groups * bmap.num_q_blocks * bmap.max_kv / _programs(
      MosaicGPUConfig(), False)
  return longest <= WHOLE_LIST_SHARE * per_sm


# Chunked items of a runtime map per query head (`runtime_items`' ``per_head``): an item walks
# one query head's chunk of a KV block's list (the group's other heads none), and a KV head's
# items run query head after query head, so that the CTAs running at once read one head's Q
# and dO. False: an item walks the chunk of every query head of the group; "auto": per head
# where the group's Q and dO outgrow `L2_BYTES` (GQA 16/4 at S=32768: 4 x 16 MiB). H100,
# MoBA S=32768 (top 32 + 2 of 256 blocks, pooled scores) at GQA 16/4, fwd+bwd ms, two
# rounds: 8.40 / 8.42 per head against 8.72 / 8.54 per group (MHA 16/16: 7.58 / 7.77;
# docs/experiments/h100-2026-12-07-gqa-head-items.json).
HEAD_ITEMS: bool | str = "auto"
L2_BYTES = 50 * 2**20  # the H100's L2 (the H200's: 60 MiB)


# Entries of a per-query-head item: "mean" (the map's mean list length, as per-group items);
# "whole": a query head's whole list (MHA's items, their dK/dV reduce-added over the group).
# A lab knob.
HEAD_CHUNK = "mean"


def head_items(groups: int, seq_q: int, head_dim: int, itemsize: int) -> bool:
  """Whether a runtime map's chunked dK/dV items run per query head (`HEAD_ITEMS`)."""
  if HEAD_ITEMS != "auto":
    return bool(HEAD_ITEMS)
  return groups > 1 and 2 * groups * seq_q * head_dim * itemsize > L2_BYTES


def runtime_items(q_counts, groups: int, chunk: int, max_entries: int,
                  per_head: bool = False):
  """Work items of a runtime map, on device: [b, hkv, n, 2] (KV block, chunk index), each
  KV block of each KV head cut into chunks of `chunk` entries of its group's longest Q list,
  in KV-block order. n is static: every KV block's last chunk, plus at most
  groups·max_entries / chunk more (max_entries bounds a head's entries over all KV blocks:
  q blocks × the selection width); items past the real ones have KV block = n_kv (no work).
  q_counts: [b, h, n_kv]. ``per_head`` (GQA): [b, hkv, n, 3] (KV block, chunk index, query
  head of the group), each query head's own list in chunks, the group's heads one after
  another (`HEAD_ITEMS`)."""
  b, h, nk = q_counts.shape
  if per_head and groups > 1:
    per = runtime_items(q_counts.reshape(b * h, 1, nk), 1, chunk, max_entries)  # [b·h, 1, n, 2]
    n = per.shape[2]
    head = jnp.broadcast_to((jnp.arange(h, dtype=jnp.int32) % groups)[None, :, None, None],
                            (b, h, n, 1))
    items = jnp.concatenate([per.reshape(b, h, n, 2), head], axis=-1)
    return items.reshape(b, h // groups, groups * n, 3)
  longest = jnp.max(q_counts.reshape(b, h // groups, groups, nk), axis=2)
  chunks = (longest + chunk - 1) // chunk
  n = min(nk + -(-groups * max_entries // chunk), nk * -(-max_entries // chunk))
  ends = jnp.cumsum(chunks, axis=-1)  # [b, hkv, nk]
  index = jnp.arange(n, dtype=jnp.int32)
  find = jax.vmap(lambda e: jnp.searchsorted(e, index, side="right"))
  block = find(ends.reshape(-1, nk)).reshape(b, h // groups, n).astype(jnp.int32)
  starts = jnp.take_along_axis(ends - chunks, jnp.minimum(block, nk - 1), axis=-1)
  return jnp.stack([block, jnp.where(block < nk, index - starts, 0)], axis=-1)


def cut_slots(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For work items [n, 3] (`static_items`): each item's slot among the KV blocks that have
  several items (-1 for a KV block's only item), and those KV blocks in slot order."""
  blocks = items[:, 0]
  cut_blocks = np.unique(blocks[np.bincount(blocks)[blocks] > 1])
  slots = np.where(np.isin(blocks, cut_blocks), np.searchsorted(cut_blocks, blocks), -1)
  return slots.astype(np.int32), cut_blocks.astype(np.int32)


def item_lists(items_ref, ids_ref, counts_ref, item, kv_head, batch, *, groups: int,
               chunk: int, shared: bool):
  """A dK/dV work item's KV block, first entry of its Q list, and per query head j of the
  GQA group: its entries, its full entries, and ``q_block(j, e)`` (the Q block of entry e).
  Static maps, runtime maps (``chunk`` > 0) and documents' maps over the static items
  (``shared``); see `attention_bwd._kernel`."""
  if chunk:  # a runtime map: each query head of the group has its own Q list
    kv_block = items_ref[batch, kv_head, item, 0]
    live = kv_block < counts_ref.shape[2]
    kv_block = jnp.where(live, kv_block, 0)
    first = items_ref[batch, kv_head, item, 1] * chunk
    # Each query head's map row: its own, or (``shared``) its batch element's.
    heads = [0] * groups if shared else [kv_head * groups + j for j in range(groups)]
    count = lambda j, c: counts_ref[batch, heads[j], kv_block, c]
    # Items of one query head (`runtime_items`' ``per_head``): the others walk nothing.
    mine = ((lambda j: items_ref[batch, kv_head, item, 2] == j) if items_ref.shape[-1] == 3
            else (lambda j: True))
    entries = [jnp.where(live & mine(j), jnp.clip(count(j, 1) - first, 0, chunk), 0)
               for j in range(groups)]
    full = [jnp.clip(count(j, 0) - first, 0, entries[j]) for j in range(groups)]
    q_block = lambda j, e: ids_ref[batch, heads[j], kv_block, first + e]
  elif shared:  # the static map's items over a runtime map that only drops its blocks
    kv_block, first = items_ref[item, 0], items_ref[item, 1]
    count = lambda c: counts_ref[batch, 0, kv_block, c]
    entries = [jnp.clip(count(1) - first, 0, items_ref[item, 2])] * groups
    full = [jnp.clip(count(0) - first, 0, entries[0])] * groups
    q_block = lambda j, e: ids_ref[batch, 0, kv_block, first + e]
  else:
    kv_block, first = items_ref[item, 0], items_ref[item, 1]
    entries = [items_ref[item, 2]] * groups
    full = [jnp.clip(counts_ref[kv_block, 0] - first, 0, entries[0])] * groups
    q_block = lambda j, e: ids_ref[kv_block, first + e]
  return kv_block, first, entries, full, q_block
