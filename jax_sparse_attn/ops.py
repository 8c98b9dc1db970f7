"""The public ops: `attention` (1-D sequences, any mask) and `na1d/na2d/na3d` (GNA).

One op, several backends (tokamax style): every backend implements
``forward(q, k, v, q_seg, kv_seg, plan, scale, config) -> (out, lse)`` and
``backward(..., out, lse, d_out, d_lse, plan, scale, config) -> (dq, dk, dv)`` on arrays in
kernel order; this file validates, builds the plan, pads/permutes, and wraps the backend in
one `jax.custom_vjp` whose residuals are (q, k, v, out, lse).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import masks as masks_lib
from . import reference as reference_lib
from . import context_parallel
from .backends import (BACKENDS, Backend, backward_delta, backward_map_blocks,
                       check_available, get_backend as _get_backend,
                       has_array_mask as _has_array_mask, resolve_backend)
from .merge import join_sink, merge_attentions
from .layout import PackedLayout, SequenceLayout, TiledLayout, cdiv
from . import plan as plan_lib
from . import softcap as softcap_lib
from .plan import AttentionPlan, make_plan

# `mesh=_LOCAL`: already inside the op's shard_map, run on the local shards.
_LOCAL = "local"
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Segment ids (packed documents) on the kernel backends build a runtime block map
# (`block_map.from_segments`): block pairs of different documents are skipped and full
# blocks inside one document need no segment test. Off: the static map, the segment test on
# every visited block (a lab switch for benchmarks).
SEGMENT_BLOCK_MAPS = True
# The largest runtime map built from segment ids, in block pairs over the batch (its rows
# are shared by the heads; beyond: the static map and the test everywhere).
_SEGMENT_MAP_BUDGET = 1 << 24


# --------------------------------------------------------------------------------------------
# The custom_vjp op on kernel-order arrays.


@functools.lru_cache(maxsize=512)
def _make_core(backend: str, plan: AttentionPlan, scale: float, config, interpret,
               bwd_plan: AttentionPlan | None = None, softcap: float | None = None):
  """`bwd_plan`: the backward's plan if it differs (gathered plans over the same tokens);
  `softcap`: logit soft-capping (`Backend.softcap`)."""
  check_available(backend, interpret)
  impl = _get_backend(backend)
  bwd_plan = bwd_plan or plan

  # A runtime block map (content-routed attention) is an argument: traced data.
  runtime = lambda bmap: {} if bmap is None else {"block_map": bmap}

  # Learned sinks (`impl.sinks`): [heads] float32, joined in the forward's epilogue.
  sunk = lambda sinks: {} if sinks is None else {"sinks": sinks}
  capping = {} if softcap is None else {"softcap": softcap}

  def forward(q, k, v, q_seg, kv_seg, bmap, sinks):
    return impl.forward(q, k, v, *_kernel_segments(plan, q_seg, kv_seg), plan, scale, config,
                        interpret, **runtime(bmap), **sunk(sinks), **capping)

  @jax.custom_vjp
  def core(q, k, v, q_seg, kv_seg, bmap, sinks):
    return forward(q, k, v, q_seg, kv_seg, bmap, sinks)

  def fwd(q, k, v, q_seg, kv_seg, bmap, sinks):
    out, lse = forward(q, k, v, q_seg, kv_seg, bmap, sinks)
    return (out, lse), (q, k, v, q_seg, kv_seg, bmap, sinks, out, lse)

  pads = _kv_pads(plan, bwd_plan)

  def bwd(res, cotangents):
    # With sinks the residual lse holds them: the kernels' backward is unchanged (the sink
    # column's value vector is zero), and the sinks' gradient is one reduction beside it.
    # rowsum(dO ∘ O) is taken once, here, and handed to the kernels folded into d_lse
    # (``out=None``: the `Backend.sinks` contract).
    q, k, v, q_seg, kv_seg, bmap, sinks, out, lse = res
    d_out, d_lse = cotangents
    d_sinks = None
    if sinks is not None:
      d_lse, out = -backward_delta(out, d_out, d_lse), None
      d_sinks = _sinks_grad(sinks, lse, d_lse)
    if pads is not None:  # the backward's key grid starts before the array
      k, v = (_pad_grid(x, plan.kv_layout.spatial_shape, pads) for x in (k, v))
      kv_seg = None if kv_seg is None else _pad_grid(kv_seg, plan.kv_layout.spatial_shape, pads)
    dq, dk, dv = impl.backward(q, k, v, *_kernel_segments(bwd_plan, q_seg, kv_seg), out, lse,
                               d_out.astype(q.dtype), d_lse.astype(jnp.float32), bwd_plan,
                               scale, config, interpret, **runtime(bmap), **capping)
    if pads is not None:
      dk, dv = (_crop_grid(x, plan.kv_layout.spatial_shape, pads) for x in (dk, dv))
    return dq, dk, dv, None, None, None, d_sinks

  core.defvjp(fwd, bwd)
  return core


def _sinks_grad(sinks, lse, folded):
  """d sinks [heads] of a forward whose lse [b, h, n] holds them: each row's sink
  probability exp(sink - lse) times ``folded`` = d_lse - rowsum(dO ∘ O) [b, h, n]."""
  p_sink = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(sinks[None, :, None] - lse))
  return jnp.sum(p_sink * folded, axis=(0, 2))


def _kv_pads(plan: AttentionPlan, bwd_plan: AttentionPlan):
  """Per-dim (before, after) padding of the caller's key grid for a backward plan whose key
  tiles start before the array (`_backward_plan`, `simulate.best_shifted_tiles`), or None."""
  fwd, bwd = plan.kv_layout, bwd_plan.kv_layout
  if not (isinstance(bwd, TiledLayout) and bwd.is_shard and not fwd.is_shard):
    return None
  lead = tuple(-o for o in bwd.origin)
  return tuple((a, p - n - a) for a, p, n in zip(lead, bwd.spatial_shape, fwd.spatial_shape))


def _pad_grid(x, spatial, pads):
  """[batch, prod(spatial), ...] in the caller's order -> the padded grid's, flattened."""
  x = x.reshape((x.shape[0], *spatial, *x.shape[2:]))
  x = jnp.pad(x, [(0, 0), *pads] + [(0, 0)] * (x.ndim - 1 - len(spatial)))
  return x.reshape((x.shape[0], -1, *x.shape[1 + len(spatial):]))


def _crop_grid(y, spatial, pads):
  """Inverse of `_pad_grid`."""
  padded = tuple(n + a + b for n, (a, b) in zip(spatial, pads))
  y = y.reshape((y.shape[0], *padded, *y.shape[2:]))
  y = y[(slice(None),) + tuple(slice(a, a + n) for n, (a, _) in zip(spatial, pads))]
  return y.reshape((y.shape[0], -1, *y.shape[1 + len(spatial):]))


def _kernel_segments(plan: AttentionPlan, q_seg, kv_seg):
  """Segment ids as backends take them: per kernel position of `plan`. Gathered plans get
  q/k/v in the caller's flat order but segment ids [batch, n] in it too: pick each kernel
  position's row (padding positions take row 0; the plan masks them anyway)."""
  if q_seg is None or not plan.gathered:
    return q_seg, kv_seg
  take = lambda s, rows: jnp.take(s, jnp.asarray(np.maximum(rows, 0), jnp.int32), axis=1)
  return take(q_seg, plan.q_rows), take(kv_seg, plan.kv_rows)


def _run_core(backend, plan, scale, config, interpret, q, k, v, q_seg, kv_seg, bwd_plan=None,
              block_map=None, sinks=None, softcap=None):
  """The backend's op: (out, lse [b, h, n]). `sinks` ([heads] float32, `_check_sinks`):
  joined in the kernels' epilogue where the backend takes them (`Backend.sinks`), else to
  the kernels' output (`_join_sinks`). `softcap`: logit soft-capping (`softcap.check`)."""
  if softcap is not None and not _get_backend(backend).softcap:
    raise ValueError(f"logits_soft_cap is not supported by backend={backend!r}")
  core = _make_core(backend, plan, float(scale), config, interpret, bwd_plan, softcap)
  if sinks is None or _get_backend(backend).sinks:
    return core(q, k, v, q_seg, kv_seg, block_map, sinks)
  out, lse = core(q, k, v, q_seg, kv_seg, block_map, None)
  out, lse = _join_sinks(out, lse.transpose(0, 2, 1), sinks)
  return out, lse.transpose(0, 2, 1)


# --------------------------------------------------------------------------------------------
# Validation.


def _check_qkv(query, key, value, spatial_rank: int | None):
  names = ("query", "key", "value")
  for name, x in zip(names, (query, key, value)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    want = 4 if spatial_rank is None else 3 + spatial_rank
    if x.ndim != want:
      layout = ("[batch, seq, heads, head_dim]" if spatial_rank is None else
                f"[batch, {', '.join(f'x{i}' for i in range(spatial_rank))}, heads, head_dim]")
      raise ValueError(f"{name} must have rank {want} ({layout}), got shape {x.shape}")
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {x.dtype}")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
                     f"{value.dtype}")
  if key.shape != value.shape:
    raise ValueError(f"key and value must have the same shape, got {key.shape} and {value.shape}")
  if query.shape[0] != key.shape[0]:
    raise ValueError(f"query and key must have the same batch size, got {query.shape[0]} and "
                     f"{key.shape[0]}")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query and key must have the same head_dim, got {query.shape[-1]} and "
                     f"{key.shape[-1]}")
  heads, kv_heads = query.shape[-2], key.shape[-2]
  if kv_heads == 0 or heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) (GQA/MQA)")
  if spatial_rank is not None and query.shape[1:-2] != key.shape[1:-2]:
    raise ValueError(f"query and key must have the same spatial shape, got {query.shape[1:-2]} "
                     f"and {key.shape[1:-2]}")


def _check_grid_tokens(mask, seq_q: int, seq_kv: int):
  """A (packed) neighborhood mask covers exactly the sequence's tokens."""
  if isinstance(mask, masks_lib.Neighborhood):
    what, shape = "neighborhood", mask.spatial_shape
  elif isinstance(mask, masks_lib.PackedNeighborhood):
    what, shape = "packed neighborhood", mask.spatial_shapes
  else:
    return
  if mask.num_tokens != seq_q or mask.num_tokens != seq_kv:
    raise ValueError(f"{what} mask covers {mask.num_tokens} tokens ({shape}) but "
                     f"seq_q={seq_q}, seq_kv={seq_kv}")


def _check_scale(scale, head_dim):
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, jax.core.Tracer):
    raise ValueError("scale must be a Python float (it is compiled into the kernels)")
  try:
    scale = float(scale)
  except (TypeError, ValueError):
    raise ValueError(f"scale must be a Python float or None, got {scale!r}") from None
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  return scale


def _block_sizes(backend: str, head_dim: int, dtype, block_q, block_kv, seq_q=None, seq_kv=None):
  if backend == "reference":
    return 1, 1
  impl = _get_backend(backend)
  dq, dk = impl.default_blocks(head_dim, dtype)
  bq = dq if block_q is None else block_q
  bk = dk if block_kv is None else block_kv
  for name, b in (("block_q", bq), ("block_kv", bk)):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 or b & (b - 1):
      raise ValueError(f"{name} must be a positive power of two, got {b!r}")
  # Small problems: don't pad a 40-token sequence to 128.
  if seq_q is not None and block_q is None:
    bq = min(bq, max(impl.min_block, 1 << max(0, (seq_q - 1).bit_length())))
  if seq_kv is not None and block_kv is None:
    bk = min(bk, max(impl.min_block, 1 << max(0, (seq_kv - 1).bit_length())))
  return bq, bk


# --------------------------------------------------------------------------------------------
# attention


def attention(query, key, value, mask: masks_lib.Mask | None = None, *, scale: float | None = None,
              segment_ids=None, backend: str = "auto", interpret: bool = False,
              return_lse: bool = False, block_q: int | None = None, block_kv: int | None = None,
              config=None, mesh=None, context_axis: str | None = None, strategy: str = "auto",
              context_layout: str = "contiguous", block_selection=None, sinks=None,
              logits_soft_cap: float | None = None):
  """Block-sparse attention over 1-D sequences.

  Args:
    query: [batch, seq_q, heads, head_dim], float32/bfloat16/float16.
    key, value: [batch, seq_kv, kv_heads, head_dim]; ``heads % kv_heads == 0`` (GQA/MQA).
    mask: a `jax_sparse_attn.masks` spec (None = dense). Evaluated on token indices.
    scale: softmax scale, default ``head_dim ** -0.5``.
    segment_ids: [batch, seq] int32 (self-attention, packed documents) or a pair
      ``(q_segment_ids [batch, seq_q], kv_segment_ids [batch, seq_kv])``; tokens attend only
      within equal ids. Combines with any mask.
    backend: "auto" | "reference" | "xla" | "triton" | "mosaic_gpu" | "mosaic".
    interpret: run Pallas kernels in interpret mode (CPU testing).
    return_lse: also return the log-sum-exp [batch, seq_q, heads] float32 (-inf where a row
      sees no key).
    block_q, block_kv: override the backend's block sizes (powers of two).
    config: backend-specific tuning config (e.g. `pallas_kernels.gpu.TritonConfig`).
    mesh: a `jax.sharding.Mesh` to run on (default: the one set with `jax.set_mesh`, if
      any). Batch and heads are sharded over its axes named in
      `context_parallel.BATCH_AXES` / `HEAD_AXES` ("data", "model", ...) where they divide.
    context_axis: a mesh axis to shard the sequence over (context parallelism); seq_q and
      seq_kv must be divisible by its size. Ignored without a mesh.
    strategy: "auto" | "ring" | "halo" | "allgather" (see `jax_sparse_attn.context_parallel`).
    context_layout: "contiguous" (device i holds the i-th chunk of the sequence) or
      "zigzag" (chunks i and 2N-1-i, for causal load balance; inputs in
      `context_parallel.to_zigzag` order, and so is the output).
    block_selection: a `routing.BlockSelection` (content-routed attention: MoBA, gates):
      per query block and head, the KV blocks to visit, chosen at run time; pairs attend
      when ``mask`` allows them and their key block is selected. Its ids may also hold one
      row per KV head, shared by that head's query heads (NSA's group-shared selection,
      `routing.topk_blocks(..., shared_by_group=True)`). Blocks are
      ``block_selection.block_size`` tokens on both sides. Backends "xla", "triton",
      "mosaic_gpu" (128-token blocks, head_dim <= 128) and "mosaic" (TPU; blocks of 128k),
      "auto" as for other masks. On a mesh batch and heads shard with the selection's rows;
      a context axis shards the sequence (and the rows) by all-gathering K/V
      (`context_parallel.routed_sequence`; with the zigzag layout the rows follow the
      queries' order and the ids are sequence block numbers: `routing.select`'s
      ``zigzag_shards``).
    sinks: learned attention-sink logits (gpt-oss), a float scalar or ``[heads]`` array
      (e.g. a trained parameter): one more logit per head in every row's softmax
      denominator, with a zero value vector. The output is scaled by
      ``sigmoid(lse - sinks)`` and the returned lse includes the sink; gradients reach
      q, k, v and the sinks. Works with every backend, mask and mesh option.
    logits_soft_cap: a positive float ``c`` (Gemma 2: 50, Grok-1: 30): every score
      ``s = q·k·scale`` becomes ``c·tanh(s / c)`` before the mask and the softmax
      (gradients through it). Every backend, mask and mesh option; None: no cap.

  Returns:
    out [batch, seq_q, heads, head_dim] in the query dtype (zeros on fully masked rows), and
    lse if ``return_lse``.
  """
  _check_qkv(query, key, value, None)
  sinks = _check_sinks(sinks, query.shape[-2])
  if mask is None:
    mask = masks_lib.Full()
  masks_lib._check_mask(mask, "mask")
  for term, _ in masks_lib.array_terms(mask):
    if term.shape != (query.shape[1], key.shape[1]):
      raise ValueError(f"mask array shape {term.shape} must be (seq_q, seq_kv) = "
                       f"{(query.shape[1], key.shape[1])}")
  _check_grid_tokens(mask, query.shape[1], key.shape[1])
  scale = _check_scale(scale, query.shape[-1])
  cap = softcap_lib.check(logits_soft_cap)
  b, sq = query.shape[:2]
  skv = key.shape[1]
  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = segment_ids
    else:
      q_seg = kv_seg = segment_ids
      if sq != skv:
        raise ValueError("a single segment_ids array needs seq_q == seq_kv; pass "
                         "(q_segment_ids, kv_segment_ids)")
    for name, seg, s in (("q segment_ids", q_seg, sq), ("kv segment_ids", kv_seg, skv)):
      if seg.shape != (b, s) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape {(b, s)}, got "
                         f"{seg.shape} {seg.dtype}")
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)  # NumPy too

  if block_selection is not None:
    return _routed(query, key, value, mask, scale, q_seg, kv_seg, backend, interpret,
                   return_lse, block_q, block_kv, config, mesh, context_axis, block_selection,
                   strategy, context_layout, sinks, cap)
  backend = resolve_backend(backend, mask, dtype=query.dtype, head_dim=query.shape[-1],
                            segments=q_seg is not None, block_q=block_q, block_kv=block_kv,
                            config=config, scale=scale)
  context_parallel.check_options(strategy, context_layout)
  mesh = context_parallel.resolve_mesh(mesh, context_axis)
  # The dense reference and explicit arrays of more than 4 runs per row run unsharded (XLA
  # partitions them as it can).
  if mesh is not None and backend != "reference" and not _has_array_mask(mask):
    n = mesh.shape[context_axis] if context_axis is not None else 1
    bq, bk = _block_sizes(backend, query.shape[-1], query.dtype, block_q, block_kv, sq // n,
                          skv // n)
    single = functools.partial(attention, mask=mask, scale=scale, backend=backend,
                               interpret=interpret, block_q=block_q, block_kv=block_kv,
                               config=config, mesh=_LOCAL, return_lse=True,
                               logits_soft_cap=cap)
    # Batch and heads sharded only: each device's kernels join its heads' sinks; a context
    # axis merges the shards' partial rows first, then the sinks join once.
    local_sinks = sinks if n == 1 else None
    out, lse = context_parallel.attention(
        query, key, value, mask, q_seg, kv_seg, mesh=mesh, context_axis=context_axis,
        strategy=strategy, context_layout=context_layout, backend=backend, scale=scale,
        block_q=bq, block_kv=bk, config=config, interpret=interpret,
        single_device=lambda q, k, v, qs, ks, s=None: single(
            q, k, v, segment_ids=None if qs is None else (qs, ks), sinks=s),
        sinks=local_sinks, softcap=cap)
    return _finish(out, lse, return_lse, None if n == 1 else sinks)
  if context_layout != "contiguous":
    raise ValueError("context_layout='zigzag' needs a mesh with a context_axis (and a "
                     "kernel or xla backend)")
  if backend == "reference":
    out, lse = reference_lib.attention(query, key, value, mask, scale=scale,
                                       q_segment_ids=q_seg, kv_segment_ids=kv_seg, softcap=cap)
    return _finish(out, lse, return_lse, sinks)
  if backend != "xla" and _has_array_mask(mask):
    raise ValueError(f"this from_array mask runs on backend='xla' or 'reference', not "
                     f"{backend!r}: rows of up to {masks_lib.MAX_TERMS} runs of keys (and "
                     f"row bounds in a union of at most {masks_lib.MAX_TERMS} interval "
                     f"terms) run on every backend, others on 'xla' only")

  bq, bk = _block_sizes(backend, query.shape[-1], query.dtype, block_q, block_kv, sq, skv)
  plan = make_plan(mask, SequenceLayout(sq, bq), SequenceLayout(skv, bk))
  out, lse = run_plan(backend, plan, scale, config, interpret, query, key, value, q_seg, kv_seg,
                      block_map=_segment_map(backend, plan, q_seg, kv_seg), sinks=sinks,
                      softcap=cap)
  return (out, lse) if return_lse else out


def _check_sinks(sinks, heads: int):
  """Learned sink logits as the kernels take them: float32 [heads] (None passes)."""
  if sinks is None:
    return None
  if not hasattr(sinks, "shape"):
    sinks = jnp.asarray(sinks, jnp.float32) if isinstance(sinks, (int, float)) else sinks
  if (not hasattr(sinks, "dtype") or not jnp.issubdtype(sinks.dtype, jnp.floating)
      or tuple(sinks.shape) not in ((), (heads,))):
    raise ValueError(f"sinks must be a float scalar or a float array of shape [heads] = "
                     f"[{heads}], got {getattr(sinks, 'shape', type(sinks).__name__)} "
                     f"{getattr(sinks, 'dtype', '')}".rstrip())
  return jnp.broadcast_to(jnp.asarray(sinks).astype(jnp.float32), (heads,))


def _join_sinks(out, lse, sinks):
  """out [..., heads, d] and lse [..., heads] with a sink logit per head joined to each
  row's softmax (a column whose value vector is zero): out · exp(lse − lse ⊕ sink) (a row
  that sees no key stays zero) and lse ⊕ sink. For the paths whose kernels do not join
  them (`Backend.sinks`): meshes, merges, the reference."""
  if sinks is None:
    return out, lse
  lse_joined, share = join_sink(lse, sinks, lse > -jnp.inf)
  return (out.astype(jnp.float32) * share[..., None]).astype(out.dtype), lse_joined


def _finish(out, lse, return_lse: bool, sinks=None):
  out, lse = _join_sinks(out, lse, sinks)
  return (out, lse) if return_lse else out


def _segment_map(backend: str, plan: AttentionPlan, q_seg, kv_seg):
  """The runtime block map of packed documents (`block_map.from_segments`) where segment ids
  are given to a kernel backend and the map stays small; else None
  (the plan's static map, segment ids tested on every visited block)."""
  from . import block_map as block_map_lib
  bmap = plan.block_map
  if q_seg is None or not SEGMENT_BLOCK_MAPS or backend == "reference":  # (not registered)
    return None
  impl = _get_backend(backend)
  if not impl.segment_maps or bmap.partial_groups != (None,) or bmap.num_visited == 0:
    return None
  b = q_seg.shape[0]
  if b * bmap.num_q_blocks * bmap.num_kv_blocks > _SEGMENT_MAP_BUDGET:
    return None
  fits = impl.runtime_map_fits  # TPU: a block's rows in scalar memory
  if fits is not None and not fits(max(bmap.max_kv, bmap.max_q), b):
    return None
  return block_map_lib.from_segments(q_seg, kv_seg, bmap)


def _routed(query, key, value, mask, scale, q_seg, kv_seg, backend, interpret, return_lse,
            block_q, block_kv, config, mesh, context_axis, selection, strategy="auto",
            context_layout="contiguous", sinks=None, cap=None):
  """`attention` with a runtime block selection (`routing`); `cap`: logit soft-capping."""
  from .routing import BlockSelection
  if not isinstance(selection, BlockSelection):
    raise ValueError(f"block_selection must be a jax_sparse_attn.routing.BlockSelection, got "
                     f"{type(selection).__name__}")
  bs = selection.block_size
  b, sq, h = query.shape[:3]
  skv = key.shape[1]
  nq = -(-sq // bs)
  ids = selection.ids
  hkv = key.shape[2]
  shapes = ((b, h, nq), (b, hkv, nq)) if hkv and h % hkv == 0 else ((b, h, nq),)
  if (not hasattr(ids, "shape") or ids.ndim != 4 or tuple(ids.shape[:3]) not in shapes
      or not jnp.issubdtype(ids.dtype, jnp.integer)):
    raise ValueError(f"block_selection.ids must be an integer [batch, heads, num_q_blocks, k] "
                     f"= [{b}, {h}, {nq}, k] array (block_size {bs}; or [{b}, {hkv}, {nq}, k], "
                     f"one row per KV head shared by its query heads), got "
                     f"{getattr(ids, 'shape', None)}")
  if ids.shape[1] != h:  # one selection per KV head (NSA): each query head of the group takes it
    ids = jnp.repeat(ids, h // hkv, axis=1)
  for name, given in (("block_q", block_q), ("block_kv", block_kv)):
    if given is not None and given != bs:
      raise ValueError(f"{name}={given} differs from block_selection.block_size={bs}")
  context_parallel.check_options(strategy, context_layout)
  mesh = context_parallel.resolve_mesh(mesh, context_axis)
  if mesh is not None:
    if context_axis is not None and mesh.shape[context_axis] > 1:
      backend = _routed_backend(backend, mask, query, q_seg, bs, config, scale)
      local = lambda plan, q, k, v, ids, qs, ks: _run_routed(
          backend, plan, scale, config, interpret, q, k, v, qs, ks, ids, cap=cap)
      out, lse = context_parallel.routed_sequence(
          query, key, value, mask, ids, q_seg, kv_seg, bs, mesh=mesh,
          context_axis=context_axis, strategy=strategy, context_layout=context_layout,
          run=local)
      return _finish(out, lse, return_lse, sinks)
    if context_layout != "contiguous":
      raise ValueError("context_layout='zigzag' needs a context_axis of size > 1")
    single = lambda q, k, v, ids, qs, ks: _routed(
        q, k, v, mask, scale, qs, ks, backend, interpret, True, block_q, block_kv, config,
        _LOCAL, None, BlockSelection(ids, bs), cap=cap)
    out, lse = context_parallel.routed(query, key, value, ids, q_seg, kv_seg, mesh=mesh,
                                       context_axis=context_axis, single_device=single)
    return _finish(out, lse, return_lse, sinks)
  if context_layout != "contiguous":
    raise ValueError("context_layout='zigzag' needs a mesh with a context_axis")
  backend = _routed_backend(backend, mask, query, q_seg, bs, config, scale)
  plan = make_plan(mask, SequenceLayout(sq, bs), SequenceLayout(skv, bs))
  out, lse = _run_routed(backend, plan, scale, config, interpret, query, key, value, q_seg,
                         kv_seg, ids, sinks, cap)
  return (out, lse) if return_lse else out


def _routed_backend(backend, mask, query, q_seg, bs, config, scale) -> str:
  """The backend of a content-routed call: "auto" takes a kernel backend that runs runtime
  maps on `bs`-token blocks, else "xla"; an explicit one must run them."""
  if backend == "auto":
    backend = resolve_backend("auto", mask, dtype=query.dtype, head_dim=query.shape[-1],
                              segments=q_seg is not None, block_q=bs, block_kv=bs,
                              config=config, scale=scale)
    if backend not in ("triton", "mosaic_gpu", "mosaic") or (backend == "mosaic" and bs % 128):
      backend = "xla"  # the TPU kernels' blocks are multiples of 128
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "reference" or not _get_backend(backend).runtime_maps:
    raise ValueError(f"block_selection runs on backends 'xla', 'triton', 'mosaic_gpu' and "
                     f"'mosaic', not {backend!r}")
  if _has_array_mask(mask, routed=True):
    raise ValueError("block_selection takes structured or function masks, not from_array")
  return backend


def _run_routed(backend, plan, scale, config, interpret, query, key, value, q_seg, kv_seg,
                ids, sinks=None, cap=None):
  """Attention over `plan`'s static mask AND the selected KV blocks `ids` [batch, heads,
  plan's Q blocks, k] (global KV block numbers of `plan.kv_layout`): (out, lse)."""
  from . import block_map as block_map_lib
  bmap = block_map_lib.from_selection(ids, plan.block_map,
                                      None if q_seg is None else (q_seg, kv_seg))
  return run_plan(backend, plan, scale, config, interpret, query, key, value, q_seg, kv_seg,
                  block_map=bmap, sinks=sinks, softcap=cap)


def run_plan(backend: str, plan: AttentionPlan, scale: float, config, interpret, query, key,
             value, q_seg=None, kv_seg=None, bwd_plan: AttentionPlan | None = None,
             block_map=None, sinks=None, softcap=None):
  """Run a kernel backend on the caller's tensors for a plan made on their layouts.

  query: [batch, *q_shape, heads, head_dim] (q_shape: the q layout's sequence length or
  spatial shape); key, value likewise on the kv layout; segment ids [batch, *q_shape] and
  [batch, *kv_shape]. Pads/permutes into kernel order as the backend needs. Returns out (like
  query) and lse [batch, *q_shape, heads] float32. `bwd_plan`: see `_make_core`; `sinks`,
  `softcap`: see `_run_core`.
  """
  impl = _get_backend(backend)
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)  # NumPy too
  b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
  hkv = key.shape[-2]
  q_layout, kv_layout = plan.q_layout, plan.kv_layout
  if isinstance(q_layout, TiledLayout) and impl.gathers:
    # The kernels read and write the caller's rows through plan.q_rows/kv_rows, so the
    # backward may use its own tiling (its kernels' tiles differ from the forward's).
    flat = lambda x, heads: x.reshape(b, -1, heads, d)
    if q_seg is not None:
      q_seg, kv_seg = q_seg.reshape(b, -1), kv_seg.reshape(b, -1)
    out, lse = _run_core(backend, plan_lib.gathered(plan), scale, config, interpret,
                         flat(query, h), flat(key, hkv), flat(value, hkv), q_seg, kv_seg,
                         bwd_plan, sinks=sinks, softcap=softcap)
    return out.reshape(query.shape), lse.transpose(0, 2, 1).reshape(query.shape[:-1])
  q, k, v = q_layout.to_kernel(query), kv_layout.to_kernel(key), kv_layout.to_kernel(value)
  if q_seg is not None:
    q_seg, kv_seg = q_layout.to_kernel(q_seg), kv_layout.to_kernel(kv_seg)
  out, lse = _run_core(backend, plan, scale, config, interpret, q, k, v, q_seg, kv_seg,
                       block_map=block_map, sinks=sinks, softcap=softcap)
  return q_layout.from_kernel(out), q_layout.from_kernel(lse.transpose(0, 2, 1))


# --------------------------------------------------------------------------------------------
# Neighborhood attention


def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, *,
       scale: float | None = None, kv_valid=None, segment_ids=None, additional_keys=None,
       additional_values=None, additional_valid=None, backend: str = "auto",
       interpret: bool = False, return_lse: bool = False, q_tile_shape=None,
       kv_tile_shape=None, block_q: int | None = None, block_kv: int | None = None,
       config=None, tiling: "NATiling | None" = None, mesh=None,
       context_axis: str | None = None, strategy: str = "auto", sinks=None,
       logits_soft_cap: float | None = None):
  """Generalized neighborhood attention on [batch, *spatial, heads, head_dim] (1-3 spatial dims).

  kernel_size/stride/dilation: int or one int per spatial dim; is_causal: bool or per-dim.
  Tokens are permuted into spatial tiles (``q_tile_shape``/``kv_tile_shape``, chosen by the
  simulator when None) so the kernels' blocks are tiles. Returns out (and lse
  [batch, *spatial, heads]) in the input layout.

  kv_valid: [batch, *spatial] bool, the keys that may be attended (a padding mask, in the
    fused kernels: no N x N mask). Queries keep their neighborhood; a query whose whole
    neighborhood is invalid returns zeros (lse -inf). Invalid positions still produce an
    output row (mask them downstream as usual).
  segment_ids: [batch, *spatial] int: tokens attend only inside their neighborhood AND to
    keys of the same id (several images packed on one grid; each keeps the shared grid's
    windows, clipped to its segment). With kv_valid, ids must be >= 0.
  additional_keys, additional_values: [batch, n_extra, kv_heads, head_dim]: extra tokens
    (text, registers, global tokens) every query attends to beside its neighborhood
    (NATTEN's ``additional_keys``). Computed as a second attention pass merged by
    log-sum-exp (`merge_attentions`); gradients reach them. additional_valid:
    [batch, n_extra] bool masks padded extra tokens.

  With ``tiling=na_tiling(...)`` the inputs are already in tiled order,
  ``[batch, tiling.num_tokens, heads, head_dim]``, and so is the output: no permutation per
  call (kernel_size etc. must equal the tiling's); kv_valid / segment_ids are then
  [batch, tiling.num_tokens] in the same order.

  mesh, context_axis, strategy: as in `attention`; the context axis shards the leading
  spatial dim (time in video), which its size must divide; strategy "auto" | "halo" |
  "allgather". Extra tokens run on any mesh (replicated over the context axis: each device
  attends its slab to all of them); so do kv_valid / segment_ids (the keys' ids travel
  with their K/V halos).

  sinks: learned attention-sink logits, a float scalar or ``[heads]`` array: as in
  `attention` (one more logit per head in each query's softmax denominator).
  logits_soft_cap: as in `attention` (scores ``c·tanh(s / c)``; the extra tokens' too).
  """
  extra = (additional_keys is not None or additional_values is not None
           or additional_valid is not None)
  if sinks is not None and extra:  # joined after the merge with the extra tokens
    sinks = _check_sinks(sinks, getattr(query, "shape", (0, 0))[-2])
    out, lse = na(
        query, key, value, kernel_size, stride, dilation, is_causal, scale=scale,
        kv_valid=kv_valid, segment_ids=segment_ids, additional_keys=additional_keys,
        additional_values=additional_values, additional_valid=additional_valid,
        backend=backend, interpret=interpret, return_lse=True, q_tile_shape=q_tile_shape,
        kv_tile_shape=kv_tile_shape, block_q=block_q, block_kv=block_kv, config=config,
        tiling=tiling, mesh=mesh, context_axis=context_axis, strategy=strategy,
        logits_soft_cap=logits_soft_cap)
    return _finish(out, lse, return_lse, sinks)
  context_parallel.check_options(strategy, "contiguous")
  if extra:
    return _na_with_extra(query, key, value, kernel_size, stride, dilation, is_causal,
                          scale=scale, kv_valid=kv_valid, segment_ids=segment_ids,
                          additional_keys=additional_keys, additional_values=additional_values,
                          additional_valid=additional_valid, backend=backend,
                          interpret=interpret, return_lse=return_lse,
                          q_tile_shape=q_tile_shape, kv_tile_shape=kv_tile_shape,
                          block_q=block_q, block_kv=block_kv, config=config, tiling=tiling,
                          mesh=mesh, context_axis=context_axis, strategy=strategy,
                          logits_soft_cap=logits_soft_cap)
  if tiling is not None:
    if context_parallel.resolve_mesh(mesh, context_axis) is not None:
      raise ValueError("tiling= runs on one device; on a mesh pass the spatial layout")
    want = masks_lib.neighborhood(tiling.mask.spatial_shape, kernel_size, stride, dilation,
                                  is_causal)
    if want != tiling.mask:
      raise ValueError("kernel_size/stride/dilation/is_causal differ from the tiling's mask")
    return _na_tiled(query, key, value, tiling, scale, backend, interpret, return_lse, config,
                     kv_valid, segment_ids, sinks, logits_soft_cap)
  if not hasattr(query, "ndim") or query.ndim not in (4, 5, 6):
    raise ValueError("query must be [batch, *spatial, heads, head_dim] with 1 to 3 spatial "
                     f"dims, got shape {getattr(query, 'shape', None)}")
  ndim = query.ndim - 3
  _check_qkv(query, key, value, ndim)
  sinks = _check_sinks(sinks, query.shape[-2])
  spatial = tuple(query.shape[1:1 + ndim])
  mask = masks_lib.neighborhood(spatial, kernel_size, stride, dilation, is_causal)
  scale = _check_scale(scale, query.shape[-1])
  cap = softcap_lib.check(logits_soft_cap)
  q_seg, kv_seg = _na_segments(kv_valid, segment_ids, (query.shape[0],) + spatial,
                               "[batch, *spatial]")
  segments = q_seg is not None
  tile_block = lambda tile, name: (None if tile is None else
                                   math.prod(masks_lib._as_tuple(tile, ndim, name)))
  backend = resolve_backend(backend, mask, dtype=query.dtype, head_dim=query.shape[-1],
                            segments=segments,
                            block_q=(tile_block(q_tile_shape, "q_tile_shape")
                                     if block_q is None else block_q),
                            block_kv=(tile_block(kv_tile_shape, "kv_tile_shape")
                                      if block_kv is None else block_kv),
                            config=config, scale=scale)
  b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
  hkv = key.shape[-2]
  if backend == "reference":
    n = math.prod(spatial)
    flat_seg = lambda s: None if s is None else s.reshape(b, n)
    out, lse = reference_lib.attention(query.reshape(b, n, h, d), key.reshape(b, n, hkv, d),
                                       value.reshape(b, n, hkv, d), mask, scale=scale,
                                       q_segment_ids=flat_seg(q_seg),
                                       kv_segment_ids=flat_seg(kv_seg), softcap=cap)
    return _finish(out.reshape(query.shape), lse.reshape(query.shape[:-1]), return_lse, sinks)

  bq, bk = _block_sizes(backend, d, query.dtype, block_q, block_kv)
  impl = _get_backend(backend)
  default_tiles = (q_tile_shape is None and kv_tile_shape is None and block_q is None
                   and block_kv is None)
  if q_tile_shape is None or kv_tile_shape is None:
    best_q, best_kv = auto_tiles(impl, mask, bq, bk, half_q=block_q is None,
                                 segments=segments)
    q_tile_shape = tuple(q_tile_shape or best_q)
    kv_tile_shape = tuple(kv_tile_shape or best_kv)
  q_tile_shape = masks_lib._as_tuple(q_tile_shape, ndim, "q_tile_shape")
  kv_tile_shape = masks_lib._as_tuple(kv_tile_shape, ndim, "kv_tile_shape")
  for name, tile in (("q_tile_shape", q_tile_shape), ("kv_tile_shape", kv_tile_shape)):
    n = math.prod(tile)
    if any(t <= 0 for t in tile) or n & (n - 1):
      raise ValueError(f"{name} must be positive with a power-of-two product, got {tile}")
  mesh = context_parallel.resolve_mesh(mesh, context_axis)
  if mesh is not None:
    out, lse = _na_on_mesh(query, key, value, mask, kv_valid, segment_ids, q_seg, kv_seg,
                           mesh=mesh, context_axis=context_axis, strategy=strategy,
                           impl=impl, backend=backend, scale=scale, interpret=interpret,
                           config=config, q_tile_shape=q_tile_shape,
                           kv_tile_shape=kv_tile_shape, default_tiles=default_tiles, cap=cap)
    return _finish(out, lse, return_lse, sinks)
  plan = make_plan(mask, TiledLayout(spatial, mask.dilation, q_tile_shape),
                   TiledLayout(spatial, mask.dilation, kv_tile_shape))
  # The backward's own plan: its tiles where `na` picks them, its blocks where the caller's
  # tiles make blocks it cannot take (`Backend.backward_runs`).
  own = default_tiles or (impl.backward_runs is not None and not impl.backward_runs(plan, d))
  bwd_plan = (_backward_plan(impl, mask, plan, d, query.dtype, config, segments=segments)
              if own and impl.gathers else None)
  if (default_tiles and bwd_plan is not None
      and _shares_tiles(impl, mask, plan, bwd_plan, segments)):
    plan = make_plan(mask, bwd_plan.q_layout, bwd_plan.kv_layout)  # one plan for both passes
    bwd_plan = None
  out, lse = run_plan(backend, plan, scale, config, interpret, query, key, value, q_seg,
                      kv_seg, bwd_plan=bwd_plan, sinks=sinks, softcap=cap)
  return (out, lse) if return_lse else out


def _na_on_mesh(query, key, value, mask, kv_valid, segment_ids, q_seg, kv_seg, *, mesh,
                context_axis, strategy, impl, backend, scale, interpret, config, q_tile_shape,
                kv_tile_shape, default_tiles, cap=None):
  """`na` on a mesh: (out, lse), each device running it on its shards with the tiles chosen
  by the caller."""
  b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
  hkv, ndim = key.shape[-2], query.ndim - 3
  single = functools.partial(
      na, kernel_size=mask.kernel_size, stride=mask.stride, dilation=mask.dilation,
      is_causal=mask.is_causal, scale=scale, backend=backend, interpret=interpret,
      return_lse=True, q_tile_shape=q_tile_shape, kv_tile_shape=kv_tile_shape, config=config,
      mesh=_LOCAL, logits_soft_cap=cap)
  sharded_context = context_axis is not None and mesh.shape[context_axis] > 1
  if (kv_valid is not None or segment_ids is not None) and not sharded_context:
    # Batch and heads sharded, each device runs its part with its rows' masks.
    qkv, lse_spec, _, batch_axes, _ = context_parallel._local_specs(mesh, None, b, h, hkv, ndim)
    named = [(n, jnp.asarray(x)) for n, x in (("kv_valid", kv_valid),
                                               ("segment_ids", segment_ids)) if x is not None]
    body = lambda q, k, v, *xs: single(q, k, v, **{n: x for (n, _), x in zip(named, xs)})
    seg_spec = jax.sharding.PartitionSpec(batch_axes, *(None,) * ndim)
    return context_parallel._sharded(body, mesh, (qkv,) * 3 + (seg_spec,) * len(named),
                                     (qkv, lse_spec), query, key, value,
                                     *[x for _, x in named])
  backward_plan = (functools.partial(_backward_plan, impl, mask, head_dim=d,
                                     dtype=query.dtype, config=config,
                                     segments=q_seg is not None)
                   if default_tiles and impl.gathers else None)
  return context_parallel.na(
      query, key, value, mask, q_seg, kv_seg, mesh=mesh, context_axis=context_axis,
      strategy=strategy, backend=backend, scale=scale, q_tile=q_tile_shape,
      kv_tile=kv_tile_shape, config=config, interpret=interpret, single_device=single,
      backward_plan=backward_plan, softcap=cap)


def _na_segments(kv_valid, segment_ids, shape, layout: str):
  """(q_seg, kv_seg) int32 [shape] for the kernels' segment test, or (None, None): equal ids
  attend; invalid keys get id ``~id`` (negative: no query has it, ids being >= 0)."""
  if kv_valid is None and segment_ids is None:
    return None, None
  for name, x in (("kv_valid", kv_valid), ("segment_ids", segment_ids)):
    if x is None:
      continue
    if not hasattr(x, "shape") or tuple(x.shape) != tuple(shape):
      raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got "
                       f"{getattr(x, 'shape', None)}")
  if kv_valid is not None and jnp.asarray(kv_valid).dtype != jnp.bool_:
    raise ValueError(f"kv_valid must be a boolean array, got {jnp.asarray(kv_valid).dtype}")
  if segment_ids is not None:
    if not jnp.issubdtype(jnp.asarray(segment_ids).dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an integer array, got "
                       f"{jnp.asarray(segment_ids).dtype}")
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    if kv_valid is not None and not isinstance(segment_ids, jax.core.Tracer) and bool(
        np.any(np.asarray(segment_ids) < 0)):
      raise ValueError("segment_ids must be >= 0 when combined with kv_valid (invalid keys "
                       "take negative ids)")
  else:
    seg = jnp.zeros(shape, jnp.int32)
  if kv_valid is None:
    return seg, seg
  return seg, jnp.where(jnp.asarray(kv_valid), seg, ~seg)


def _na_with_extra(query, key, value, kernel_size, stride, dilation, is_causal, *, scale,
                   additional_keys, additional_values, additional_valid, return_lse, mesh,
                   context_axis, backend, interpret, config, tiling, logits_soft_cap=None,
                   **na_kwargs):
  """`na` with extra tokens: the neighborhood pass and a dense pass over the extra tokens,
  merged by log-sum-exp."""
  if additional_keys is None or additional_values is None:
    raise ValueError("additional_keys and additional_values must be given together")
  if not hasattr(query, "ndim") or query.ndim < 4:
    raise ValueError(f"query must be [batch, *spatial, heads, head_dim], got shape "
                     f"{getattr(query, 'shape', None)}")
  b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
  hkv = key.shape[-2] if hasattr(key, "shape") else None
  for name, x in (("additional_keys", additional_keys), ("additional_values", additional_values)):
    if (not hasattr(x, "shape") or x.ndim != 4 or x.shape[0] != b or x.shape[2] != hkv
        or x.shape[3] != d):
      raise ValueError(f"{name} must be [batch, n_extra, kv_heads, head_dim] = "
                       f"[{b}, n_extra, {hkv}, {d}], got {getattr(x, 'shape', None)}")
    if x.dtype != query.dtype:
      raise ValueError(f"{name} dtype {x.dtype} must equal the query's {query.dtype}")
  if additional_keys.shape != additional_values.shape:
    raise ValueError(f"additional_keys {additional_keys.shape} and additional_values "
                     f"{additional_values.shape} must have the same shape")
  n_extra = additional_keys.shape[1]
  if additional_valid is not None and (
      not hasattr(additional_valid, "shape") or tuple(additional_valid.shape) != (b, n_extra)
      or jnp.asarray(additional_valid).dtype != jnp.bool_):
    raise ValueError(f"additional_valid must be a boolean [batch, n_extra] = {(b, n_extra)} "
                     f"array, got {getattr(additional_valid, 'shape', None)}")
  out, lse = na(query, key, value, kernel_size, stride, dilation, is_causal, scale=scale,
                backend=backend, interpret=interpret, return_lse=True, config=config,
                tiling=tiling, mesh=mesh, context_axis=context_axis,
                logits_soft_cap=logits_soft_cap, **na_kwargs)

  def extra_pass(q, ek, ev, *valid):
    """Every (local) query against every extra token: dense, any backend's defaults."""
    flat_q = q.reshape(q.shape[0], -1, h, d)
    seg = None
    if valid:
      seg = (jnp.zeros(flat_q.shape[:2], jnp.int32),
             jnp.where(valid[0], 0, 1).astype(jnp.int32))
    o, l = attention(flat_q, ek, ev, scale=scale, segment_ids=seg, backend=backend,
                     interpret=interpret, return_lse=True, mesh=_LOCAL,
                     logits_soft_cap=logits_soft_cap)
    return o.reshape(q.shape), l.reshape(q.shape[:-1])

  valid = () if additional_valid is None else (jnp.asarray(additional_valid),)
  mesh = context_parallel.resolve_mesh(mesh, context_axis)
  if mesh is None:
    x_out, x_lse = extra_pass(query, additional_keys, additional_values, *valid)
  else:  # each device: its queries (a slab of the grid with a context axis), all extra tokens
    P = jax.sharding.PartitionSpec
    qkv, lse_spec, _, batch_axes, head_axes = context_parallel._local_specs(
        mesh, context_axis, b, h, hkv, query.ndim - 3)
    extra_spec = P(batch_axes, None, head_axes, None)
    x_out, x_lse = context_parallel._sharded(
        extra_pass, mesh, (qkv, extra_spec, extra_spec) + (P(batch_axes, None),) * len(valid),
        (qkv, lse_spec), query, additional_keys, additional_values, *valid)
  merged, merged_lse = merge_attentions([out, x_out], [lse, x_lse], out_dtype=query.dtype)
  return (merged, merged_lse) if return_lse else merged


def auto_tiles(impl: Backend, mask: masks_lib.Neighborhood, block_q: int, block_kv: int,
               half_q: bool = True, segments: bool = False):
  """The (query, key) tile shapes `na` picks for a backend's blocks: the backend's choice
  (``segments``: the call has a padding mask or segment ids), else the simulator's best,
  also over half-height query tiles where the backend runs them well (``half_q``: no
  block_q was given)."""
  if impl.choose_tiles is not None:
    return impl.choose_tiles(mask, block_q, block_kv, segments)
  from .simulate import best_tile_shapes
  options = (block_q // 2,) if impl.half_q_tiles and half_q and block_q >= 128 else ()
  return best_tile_shapes(mask, block_q, block_kv, block_q_options=options,
                          last_multiple=impl.tile_last_multiple)


# Strided neighborhoods' backward on a key grid that starts before the array where that
# holds whole windows (`simulate.best_shifted_tiles`: 3-D k8×16² stride 4×8×8, 18432 blocks
# instead of 20480 on the Triton backward's 128×64 blocks, 10368 instead of 12288 on the
# Hopper one's 128×128), K/V padded by the lead. H200 fwd+bwd (docs/experiments/
# h200-2026-12-03-backward-forms.json): Triton backward 12.93 -> 12.25 ms, Hopper 13.09 ->
# 12.00; False: the forward's grid. Off since 2026-12-07: with dQ on the forward's window
# boxes (`attention_bwd.WINDOW_DQ`, 2026-12-05) and the later dK/dV changes the forward's
# grid won three rounds on an H100 (docs/experiments/h100-2026-12-07-forms-s4096.json), fwd+bwd
# ms shifted / grid: Hopper backward 11.02, 11.29, 10.98 / 10.75, 10.79, 10.78; Triton's
# 10.90, 11.18, 11.06 / 10.63, 10.59, 10.85.
SHIFTED_KV = False


def _backward_plan(impl: Backend, mask: masks_lib.Neighborhood, plan: AttentionPlan,
                   head_dim: int, dtype, config, fit_tile=None,
                   segments: bool = False) -> AttentionPlan | None:
  """The gathered plan for the backward kernels when their best tiles differ from the
  forward plan's, else None: the forward plan's layouts (a context-parallel shard's too)
  with the backward's tiles (`fit_tile` adapts them to a shard; ``segments``: the call has a
  padding mask or segment ids, which the backward's choice of kernels may depend on)."""
  from .simulate import best_shifted_tiles, best_tile_shapes
  blocks = backward_map_blocks(impl, head_dim, dtype, config, mask, segments)
  if blocks is None:
    return None
  choose = (impl.choose_backward_tiles if impl.choose_backward_tiles and fit_tile is None
            and not plan.q_layout.is_shard and not plan.kv_layout.is_shard else best_tile_shapes)
  bwd_q, bwd_kv = (tuple((fit_tile or (lambda t: t))(t)) for t in choose(mask, *blocks))
  shifted = (best_shifted_tiles(mask, *blocks)
             if fit_tile is None and not plan.kv_layout.is_shard and SHIFTED_KV else None)
  if shifted is not None and any(shifted[2]):  # a key grid that starts before the array
    tq, tk, lead = shifted
    padded = tuple(cdiv(n + a, t) * t for n, a, t in zip(mask.spatial_shape, lead, tk))
    kv_layout = TiledLayout(padded, mask.dilation, tk, tuple(-a for a in lead))
    shifted_plan = make_plan(mask, dataclasses.replace(plan.q_layout, tile_shape=tq), kv_layout)
    # make_plan drops the mask of a grid with an origin (a shard's slab); this one covers the
    # whole array, and backends route on the mask (`picks_mosaic`), so it is kept. No
    # backward kernel re-tiles from it.
    return plan_lib.gathered(dataclasses.replace(shifted_plan, mask=mask))
  if (bwd_q, bwd_kv) == (plan.q_layout.tile_shape, plan.kv_layout.tile_shape):
    return None
  return plan_lib.gathered(make_plan(mask, dataclasses.replace(plan.q_layout, tile_shape=bwd_q),
                                     dataclasses.replace(plan.kv_layout, tile_shape=bwd_kv)))


def _shares_tiles(impl: Backend, mask, plan: AttentionPlan, bwd_plan: AttentionPlan,
                  segments: bool = False) -> bool:
  """Whether the forward runs on the backward's plan's tiles (`Backend.shares_backward_tiles`;
  ``segments``: a padding mask or segment ids): not for a key grid that starts before the
  array (strided windows' shifted grid)."""
  ql, kl = bwd_plan.q_layout, bwd_plan.kv_layout
  if (impl.shares_backward_tiles is None or any(kl.origin)
      or kl.spatial_shape != mask.spatial_shape):
    return False
  return impl.shares_backward_tiles(mask, (plan.q_layout.tile_shape, plan.kv_layout.tile_shape),
                                    (ql.tile_shape, kl.tile_shape), segments)


@dataclasses.dataclass(frozen=True)
class NATiling:
  """One token order for q, k, v and the output of neighborhood attention: spatial tiles.

  Models that keep activations tiled across many layers permute once (`tile`) before the
  first layer and once back (`untile`) after the last, and call ``na(..., tiling=t)`` on
  ``[batch, t.num_tokens, heads, head_dim]`` inputs; token-wise layers (projections, MLPs,
  norms) do not care about the order. Padding tokens (``t.num_tokens >= prod(spatial)``) are
  masked out of attention and dropped by `untile`.
  """
  mask: masks_lib.Neighborhood
  layout: TiledLayout

  @property
  def num_tokens(self) -> int:
    return self.layout.padded_len

  def tile(self, x):
    """[batch, *spatial, ...] -> [batch, num_tokens, ...]."""
    spatial = self.mask.spatial_shape
    if np.ndim(x) < len(spatial) + 1 or tuple(np.shape(x)[1:len(spatial) + 1]) != spatial:
      raise ValueError(f"x must be [batch, {', '.join(map(str, spatial))}, ...] (the "
                       f"tiling's spatial shape), got {np.shape(x)}")
    return self.layout.to_kernel(x)

  def untile(self, y):
    """[batch, num_tokens, ...] -> [batch, *spatial, ...]."""
    if np.ndim(y) < 2 or np.shape(y)[1] != self.num_tokens:
      raise ValueError(f"y must be [batch, {self.num_tokens} (num_tokens), ...], got "
                       f"{np.shape(y)}")
    return self.layout.from_kernel(y)


def na_tiling(spatial_shape, kernel_size, stride=1, dilation=1, is_causal=False, *,
              block: int = 128, tile_shape=None) -> NATiling:
  """The tiling `na(..., tiling=)` uses; tile_shape (product `block`) is chosen by the
  simulator when None."""
  from .simulate import best_tile_shapes
  mask = masks_lib.neighborhood(spatial_shape, kernel_size, stride, dilation, is_causal)
  if tile_shape is None:
    tile_shape = best_tile_shapes(mask, block, block, same=True)[0]
  tile_shape = masks_lib._as_tuple(tile_shape, mask.num_dims, "tile_shape")
  n = math.prod(tile_shape)
  if any(t <= 0 for t in tile_shape) or n & (n - 1):
    raise ValueError(f"tile_shape must be positive with a power-of-two product, got {tile_shape}")
  return NATiling(mask, TiledLayout(mask.spatial_shape, mask.dilation, tile_shape))


def _na_tiled(query, key, value, tiling: NATiling, scale, backend, interpret, return_lse, config,
              kv_valid=None, segment_ids=None, sinks=None, logits_soft_cap=None):
  if not isinstance(tiling, NATiling):
    raise ValueError(f"tiling must come from jax_sparse_attn.na_tiling, got {type(tiling).__name__}")
  _check_qkv(query, key, value, None)
  sinks = _check_sinks(sinks, query.shape[-2])
  if query.shape[1] != tiling.num_tokens or key.shape[1] != tiling.num_tokens:
    raise ValueError(f"with tiling=, inputs must be [batch, {tiling.num_tokens} (tiling.num_tokens),"
                     f" heads, head_dim]; got query {query.shape}, key {key.shape}")
  scale = _check_scale(scale, query.shape[-1])
  q_seg, kv_seg = _na_segments(kv_valid, segment_ids, (query.shape[0], tiling.num_tokens),
                               "[batch, tiling.num_tokens]")
  backend = resolve_backend(backend, tiling.mask, dtype=query.dtype, head_dim=query.shape[-1],
                            segments=q_seg is not None, block_q=tiling.layout.block,
                            block_kv=tiling.layout.block, config=config, scale=scale)
  if backend == "reference":
    raise ValueError("tiling= runs on the block-sparse backends; use the spatial layout with "
                     "backend='reference'")
  plan = make_plan(tiling.mask, tiling.layout, tiling.layout)
  out, lse = _run_core(backend, plan, scale, config, interpret, query, key, value, q_seg,
                       kv_seg, sinks=sinks, softcap=softcap_lib.check(logits_soft_cap))
  return (out, lse.transpose(0, 2, 1)) if return_lse else out


def _na_fixed(ndim):
  def fn(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **kwargs):
    if not hasattr(query, "ndim") or query.ndim != ndim + 3:
      raise ValueError(f"na{ndim}d expects query of rank {ndim + 3} "
                       f"([batch, {ndim} spatial dims, heads, head_dim]), got shape "
                       f"{getattr(query, 'shape', None)}")
    return na(query, key, value, kernel_size, stride, dilation, is_causal, **kwargs)
  fn.__name__ = f"na{ndim}d"
  fn.__doc__ = f"{ndim}-D generalized neighborhood attention; see `na`."
  return fn


na1d, na2d, na3d = _na_fixed(1), _na_fixed(2), _na_fixed(3)


PACKED_METHODS = ("auto", "per_grid", "tiled", "raster")


def na_packed(query, key, value, spatial_shapes, kernel_size, stride=1, dilation=1,
              is_causal=False, *, method: str = "auto", **kwargs):
  """Neighborhood attention over grids of different shapes packed into one sequence
  (variable sizes in one batch: images of several resolutions, videos of several lengths).

  query: [batch, total_tokens, heads, head_dim], key/value [batch, total_tokens, kv_heads,
  head_dim]: each grid of ``spatial_shapes`` row-major, one after the other
  (``total_tokens = sum(prod(shape))``). Inside each grid, NATTEN's semantics (windows
  shifted at the grid's own borders); nothing attends across grids. kernel_size etc. as in
  `na`, shared by every grid.

  method: "per_grid" (one `na` call per grid, each in its own tiles), "tiled" (one kernel
  call over every grid, each grid in its own spatial tiles: `layout.PackedLayout`),
  "raster" (`attention` with `masks.packed_neighborhood` on the packed order: any option
  `attention` takes, e.g. segment_ids or a mesh), or "auto" ("per_grid"; "raster" when
  options only `attention` takes are given). On the H200 one call per grid was the fastest
  even for 16 grids (38400 tokens, k13: 2.29 ms forward vs 4.31 tiled;
  results/h200-2026-11-29-na-extras.json): a grid's own plan gets the neighborhood
  kernels' MMA masks and no permuted copy, which the packed kernel lacks.
  Keyword arguments: scale, backend, interpret, return_lse, block_q, block_kv, config,
  logits_soft_cap (and, with "raster", the rest of `attention`'s).
  """
  mask = masks_lib.packed_neighborhood(spatial_shapes, kernel_size, stride, dilation,
                                       is_causal)
  if method not in PACKED_METHODS:
    raise ValueError(f"method must be one of {PACKED_METHODS}, got {method!r}")
  if not hasattr(query, "shape") or query.ndim != 4:
    raise ValueError(f"query must be [batch, total_tokens, heads, head_dim], got shape "
                     f"{getattr(query, 'shape', None)}")
  _check_qkv(query, key, value, None)
  _check_grid_tokens(mask, query.shape[1], key.shape[1])
  extra = set(kwargs) - {"scale", "backend", "interpret", "return_lse", "block_q", "block_kv",
                         "config", "logits_soft_cap"}
  backend = kwargs.get("backend", "auto")
  if method == "auto":
    method = "raster" if extra or backend == "reference" else "per_grid"
  if extra and method != "raster":
    raise ValueError(f"method={method!r} takes scale, backend, interpret, return_lse, "
                     f"block_q, block_kv, config, logits_soft_cap; {sorted(extra)} need "
                     f"method='raster'")
  if method == "raster":
    return attention(query, key, value, mask, **kwargs)
  if method == "per_grid":
    return_lse = kwargs.pop("return_lse", False)
    outs, lses, start = [], [], 0
    b, h, d = query.shape[0], query.shape[-2], query.shape[-1]
    for shape in mask.spatial_shapes:
      n = math.prod(shape)
      piece = lambda x: x[:, start:start + n].reshape((b, *shape) + x.shape[2:])
      out, lse = na(piece(query), piece(key), piece(value), mask.kernel_size, mask.stride,
                    mask.dilation, mask.is_causal, return_lse=True, **kwargs)
      outs.append(out.reshape(b, n, h, d))
      lses.append(lse.reshape(b, n, h))
      start += n
    out, lse = jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)
    return (out, lse) if return_lse else out
  d = query.shape[-1]
  scale = _check_scale(kwargs.get("scale"), d)
  block_q, block_kv = kwargs.get("block_q"), kwargs.get("block_kv")
  config, interpret = kwargs.get("config"), kwargs.get("interpret", False)
  backend = resolve_backend(backend, mask, dtype=query.dtype, head_dim=d, block_q=block_q,
                            block_kv=block_kv, config=config, scale=scale)
  impl = _get_backend(backend)
  bq, bk = _block_sizes(backend, d, query.dtype, block_q, block_kv)
  # Each grid in spatial tiles (the simulator's best for the shared block sizes): blocks are
  # compact windows, as for one grid, instead of rows of the raster order.
  from .simulate import best_tile_shapes
  q_grids, kv_grids = [], []
  for shape in mask.spatial_shapes:
    one = masks_lib.neighborhood(shape, mask.kernel_size, mask.stride, mask.dilation,
                                 mask.is_causal)
    tq, tk = best_tile_shapes(one, bq, bk, last_multiple=impl.tile_last_multiple)
    q_grids.append(TiledLayout(shape, one.dilation, tuple(tq)))
    kv_grids.append(TiledLayout(shape, one.dilation, tuple(tk)))
  plan = make_plan(mask, PackedLayout(tuple(q_grids)), PackedLayout(tuple(kv_grids)))
  out, lse = run_plan(backend, plan, scale, config, interpret, query, key, value,
                      softcap=softcap_lib.check(kwargs.get("logits_soft_cap")))
  return (out, lse) if kwargs.get("return_lse") else out
