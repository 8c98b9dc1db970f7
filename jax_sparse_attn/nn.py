"""Flax modules: NNX first (`NeighborhoodAttention1D/2D/3D`, `SparseAttention`), and thin
Linen equivalents (`linen.NeighborhoodAttention`, `linen.SparseAttention`).

Modules own parameters and call the functional ops (`jax_sparse_attn.na`, `.attention`),
which work without Flax. Every parameter carries logical partitioning names
(``("embed", "heads")`` for the fused ``heads*head_dim`` axis); activations are constrained
with logical axes ``("batch", "length", "heads", "head_dim")``. `DEFAULT_RULES` maps them to
a mesh with axes ``data``, ``context``, ``model``; with no mesh in context the constraints are
no-ops, so layers construct and run anywhere.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from . import context_parallel
from . import masks as masks_lib
from . import routing
from . import softcap as softcap_lib
from .ops import attention, na

# logical axis -> mesh axis
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", "context"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("embed", None),
    ("mlp", "model"),
)


def logical_spec(names: Sequence[str | None], rules=DEFAULT_RULES, mesh_axes=None) -> PartitionSpec:
  """PartitionSpec for logical axis names; axes absent from `mesh_axes` are replicated."""
  table = dict(rules)
  out = []
  for n in names:
    axis = table.get(n) if n is not None else None
    out.append(axis if (mesh_axes is None or axis in mesh_axes) else None)
  return PartitionSpec(*out)


def constrain(x, names: Sequence[str | None], rules=DEFAULT_RULES):
  """`with_sharding_constraint` by logical names under the current mesh; no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_spec(names, rules, mesh.axis_names)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)  # explicit-sharding meshes
  return jax.lax.with_sharding_constraint(x, spec)


def shard_model(model, mesh, rules=DEFAULT_RULES):
  """Place an NNX model's parameters on `mesh` following their logical partitioning names."""
  from flax import linen as ln
  state = nnx.state(model)
  with ln.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
  axes = set(mesh.axis_names)
  keep = lambda spec: PartitionSpec(*[a if a in axes else None for a in spec])
  shardings = jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, keep(s) if isinstance(s, PartitionSpec)
                                           else PartitionSpec()),
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  nnx.update(model, jax.device_put(state, shardings))
  return model


# --------------------------------------------------------------------------------------------
# Rotary embeddings (1-D and axial N-D).


def rope(x, positions, base: float = 10000.0):
  """Rotary embedding. x: [..., heads, head_dim]; positions: [..., n_axes] (broadcast over
  heads). With n axes (axial RoPE) the head_dim/2 rotation pairs are split evenly between the
  axes; pairs left over by the split are not rotated."""
  d = x.shape[-1]
  n_axes = positions.shape[-1]
  per_axis = (d // 2) // n_axes
  if per_axis == 0:
    raise ValueError(f"head_dim={d} is too small for RoPE over {n_axes} axes (needs >= {2 * n_axes})")
  freqs = base ** (-jnp.arange(per_axis, dtype=jnp.float32) / per_axis)  # [per_axis]
  angles = positions[..., None, :, None].astype(jnp.float32) * freqs  # [..., 1, n, per_axis]
  angles = angles.reshape(angles.shape[:-2] + (n_axes * per_axis,))
  rotated = 2 * n_axes * per_axis
  xs = x[..., :rotated].astype(jnp.float32).reshape(x.shape[:-1] + (rotated // 2, 2))
  x0, x1 = xs[..., 0], xs[..., 1]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(
      x.shape[:-1] + (rotated,))
  return jnp.concatenate([out.astype(x.dtype), x[..., rotated:]], axis=-1)


def _grid_positions(spatial):
  grids = jnp.meshgrid(*[jnp.arange(s) for s in spatial], indexing="ij")
  return jnp.stack(grids, axis=-1)  # [*spatial, n]


def _dense_baseline(q, k, v, causal: bool):
  """backend="dense": `jax.nn.dot_product_attention` over all tokens (no sparsity; plain
  causal for sequences). A speed baseline for benchmarks, not the same function."""
  shape = q.shape
  flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
  impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype != jnp.float32 else None
  o = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), is_causal=causal,
                                   implementation=impl)
  return o.reshape(shape)


# --------------------------------------------------------------------------------------------
# NNX


def _dense(rngs, din, dout, names, use_bias, dtype, param_dtype):
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      # eager_sharding=False: shard when a mesh is in context, never fail without one.
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names,
                                        eager_sharding=False),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],),
                                      eager_sharding=False))


class _AttentionBase(nnx.Module):
  def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None,
               head_dim: int | None, qkv_bias: bool, out_bias: bool, use_rope: bool,
               rope_base: float, qk_norm: bool, backend: str, interpret: bool,
               context_axis: str | None, dtype, param_dtype, rngs: nnx.Rngs,
               learned_sinks: bool = False, logits_soft_cap: float | None = None):
    num_kv_heads = num_kv_heads or num_heads
    if embed_dim <= 0 or num_heads <= 0:
      raise ValueError(f"embed_dim and num_heads must be positive, got {embed_dim}, {num_heads}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                       f"({num_kv_heads})")
    if head_dim is None:
      if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                         "unless head_dim is given")
      head_dim = embed_dim // num_heads
    self.context_axis = context_axis
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.use_rope, self.rope_base, self.backend, self.interpret = use_rope, rope_base, backend, interpret
    self.query = _dense(rngs, embed_dim, num_heads * head_dim, ("embed", "heads"), qkv_bias,
                        dtype, param_dtype)
    self.key = _dense(rngs, embed_dim, num_kv_heads * head_dim, ("embed", "kv_heads"), qkv_bias,
                      dtype, param_dtype)
    self.value = _dense(rngs, embed_dim, num_kv_heads * head_dim, ("embed", "kv_heads"),
                        qkv_bias, dtype, param_dtype)
    self.out = _dense(rngs, num_heads * head_dim, embed_dim, ("heads", "embed"), out_bias, dtype,
                      param_dtype)
    self.q_norm = nnx.RMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype) if qk_norm else None
    self.k_norm = nnx.RMSNorm(head_dim, rngs=rngs, param_dtype=param_dtype) if qk_norm else None
    if learned_sinks and backend == "dense":
      raise ValueError("learned_sinks needs a backend of `attention` (backend='dense' is "
                       "jax.nn.dot_product_attention, a speed baseline without sinks)")
    self.logits_soft_cap = softcap_lib.check(logits_soft_cap)
    if self.logits_soft_cap is not None and backend == "dense":
      raise ValueError("logits_soft_cap needs a backend of `attention` (backend='dense' is "
                       "jax.nn.dot_product_attention, a speed baseline without a cap)")
    # gpt-oss attention sinks: a logit per head in every row's softmax denominator.
    self.sinks = nnx.Param(nnx.with_partitioning(
        nnx.initializers.zeros_init(), ("heads",), eager_sharding=False)(
            rngs.params(), (num_heads,), param_dtype)) if learned_sinks else None

  def _sinks(self):
    return None if self.sinks is None else self.sinks[...]

  def _project(self, x, positions):
    if x.shape[-1] != self.query.in_features:
      raise ValueError(f"x's last dim must be embed_dim = {self.query.in_features}, got shape "
                       f"{x.shape}")
    lead = x.shape[:-1]
    q = self.query(x).reshape(lead + (self.num_heads, self.head_dim))
    k = self.key(x).reshape(lead + (self.num_kv_heads, self.head_dim))
    v = self.value(x).reshape(lead + (self.num_kv_heads, self.head_dim))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
    q, k = q.astype(v.dtype), k.astype(v.dtype)  # norms may promote; kernels want one dtype
    # The leading spatial (or sequence) dim is the context-parallel one (time in video).
    names = ("batch", "length") + (None,) * (len(lead) - 2)
    q = constrain(q, names + ("heads", "head_dim"))
    k = constrain(k, names + ("kv_heads", "head_dim"))
    v = constrain(v, names + ("kv_heads", "head_dim"))
    return q, k, v

  def _zigzag_shards(self, context_layout: str) -> int | None:
    """The context axis size of the zigzag layout (None: contiguous; the modules check the
    name when built); ValueError without a mesh holding the context axis, or with the dense
    baseline."""
    if context_layout == "contiguous":
      return None
    if self.backend == "dense":
      raise ValueError("backend='dense' (a speed baseline) runs the contiguous layout")
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh is None or mesh.empty or self.context_axis is None
        or self.context_axis not in mesh.axis_names):
      raise ValueError("context_layout='zigzag' needs a context_axis of the mesh set with "
                       "jax.set_mesh (inputs in context_parallel.to_zigzag order)")
    return mesh.shape[self.context_axis]

  def _project_sequence(self, x, positions, zigzag_shards=None):
    """q, k, v of ``x [batch, seq, embed_dim]``; RoPE positions default to 0..seq-1 (in the
    zigzag order of the tokens when `zigzag_shards`)."""
    if x.ndim != 3:
      raise ValueError(f"x must be [batch, seq, embed_dim], got shape {x.shape}")
    if positions is None and self.use_rope:
      order = (np.arange(x.shape[1]) if zigzag_shards is None else
               context_parallel.zigzag_permutation(x.shape[1], zigzag_shards))
      positions = jnp.broadcast_to(jnp.asarray(order), x.shape[:2])
    return self._project(x, positions[..., None] if positions is not None else None)

  def _output(self, o):
    o = o.reshape(o.shape[:-2] + (self.num_heads * self.head_dim,))
    return self.out(o)


class NeighborhoodAttention(nnx.Module):
  """N-D (generalized) neighborhood attention layer on ``[batch, *spatial, embed_dim]``.

  Args mirror `jax_sparse_attn.na` (kernel_size/stride/dilation/is_causal: int/bool or one
  per spatial dim) plus: num_kv_heads (GQA), head_dim (default embed_dim // num_heads),
  qkv_bias, use_rope (axial RoPE over the spatial coordinates), qk_norm (RMSNorm on q, k),
  backend (any of `attention`'s, or "dense": full `jax.nn.dot_product_attention`, a speed
  baseline), tile shapes, context_axis (a mesh axis that shards the leading spatial dim
  under `jax.set_mesh`: context parallelism; without a mesh it is ignored).

  ``learned_sinks``: a learned sink logit per head (gpt-oss attention sinks, `na`'s
  ``sinks``), the parameter ``core.sinks`` [heads], zeros at init. ``logits_soft_cap``:
  scores capped to ``c·tanh(s / c)`` (`na`'s ``logits_soft_cap``).

  ``extra_dim``: give it to attend to extra tokens too (text tokens of a text-to-image DiT,
  registers): the layer then owns key/value projections of its own for ``[batch, n_extra,
  extra_dim]`` features (and a key RMSNorm with qk_norm; no RoPE on them), and
  ``__call__(x, extra_tokens=, extra_valid=)`` lets every token attend to its neighborhood
  and to the extra tokens (`na`'s additional_keys). ``kv_valid`` [batch, *spatial] masks
  padded keys of the grid.
  """

  def __init__(self, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1,
               is_causal=False, *, spatial_dims: int, num_kv_heads: int | None = None,
               head_dim: int | None = None, qkv_bias: bool = True, out_bias: bool = True,
               use_rope: bool = False, rope_base: float = 10000.0, qk_norm: bool = False,
               backend: str = "auto", interpret: bool = False, context_axis: str | None = None,
               q_tile_shape=None, kv_tile_shape=None, extra_dim: int | None = None,
               learned_sinks: bool = False, logits_soft_cap: float | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.core = _AttentionBase(embed_dim, num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                               use_rope=use_rope, rope_base=rope_base, qk_norm=qk_norm,
                               backend=backend, interpret=interpret, context_axis=context_axis,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               learned_sinks=learned_sinks, logits_soft_cap=logits_soft_cap)
    self.spatial_dims = spatial_dims
    self.kernel_size, self.stride, self.dilation, self.is_causal = (kernel_size, stride,
                                                                    dilation, is_causal)
    self.q_tile_shape, self.kv_tile_shape = q_tile_shape, kv_tile_shape
    self.extra_dim = extra_dim
    if extra_dim is not None:
      if extra_dim <= 0:
        raise ValueError(f"extra_dim must be positive, got {extra_dim}")
      width = self.core.num_kv_heads * self.core.head_dim
      self.extra_key = _dense(rngs, extra_dim, width, ("embed", "kv_heads"), qkv_bias, dtype,
                              param_dtype)
      self.extra_value = _dense(rngs, extra_dim, width, ("embed", "kv_heads"), qkv_bias, dtype,
                                param_dtype)
      self.extra_k_norm = (nnx.RMSNorm(self.core.head_dim, rngs=rngs, param_dtype=param_dtype)
                           if qk_norm else None)

  def _extra_kv(self, extra_tokens, batch):
    if self.extra_dim is None:
      raise ValueError("extra_tokens needs a layer built with extra_dim= (the features' width)")
    if extra_tokens.ndim != 3 or extra_tokens.shape[0] != batch or (
        extra_tokens.shape[-1] != self.extra_dim):
      raise ValueError(f"extra_tokens must be [batch, n_extra, extra_dim] = [{batch}, n_extra, "
                       f"{self.extra_dim}], got shape {extra_tokens.shape}")
    shape = extra_tokens.shape[:2] + (self.core.num_kv_heads, self.core.head_dim)
    k = self.extra_key(extra_tokens).reshape(shape)
    v = self.extra_value(extra_tokens).reshape(shape)
    if self.extra_k_norm is not None:
      k = self.extra_k_norm(k)
    return k, v

  def __call__(self, x, extra_tokens=None, extra_valid=None, kv_valid=None):
    if x.ndim != self.spatial_dims + 2:
      raise ValueError(f"x must be [batch, {self.spatial_dims} spatial dims, embed_dim], got "
                       f"shape {x.shape}")
    positions = _grid_positions(x.shape[1:-1])[None] if self.core.use_rope else None
    q, k, v = self.core._project(x, positions)
    extra_k = extra_v = None
    if extra_tokens is not None:
      extra_k, extra_v = self._extra_kv(extra_tokens, x.shape[0])
      extra_k, extra_v = extra_k.astype(q.dtype), extra_v.astype(q.dtype)
    elif extra_valid is not None:
      raise ValueError("extra_valid needs extra_tokens")
    if self.core.backend == "dense":
      if kv_valid is not None or extra_valid is not None:
        raise ValueError("backend='dense' (a speed baseline) takes no kv_valid / extra_valid")
      if extra_k is not None:
        flat = lambda t: t.reshape(t.shape[0], -1, *t.shape[-2:])
        k = jnp.concatenate([flat(k), extra_k], axis=1)
        v = jnp.concatenate([flat(v), extra_v], axis=1)
        o = _dense_baseline(flat(q), k, v, causal=False).reshape(q.shape)
      else:
        o = _dense_baseline(q, k, v, causal=False)
    else:
      o = na(q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal,
             kv_valid=kv_valid, additional_keys=extra_k, additional_values=extra_v,
             additional_valid=extra_valid, backend=self.core.backend,
             interpret=self.core.interpret, q_tile_shape=self.q_tile_shape,
             kv_tile_shape=self.kv_tile_shape, context_axis=self.core.context_axis,
             sinks=self.core._sinks(), logits_soft_cap=self.core.logits_soft_cap)
    return self.core._output(o)


def _fixed_dims(n):
  class Fixed(NeighborhoodAttention):
    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False,
                 **kwargs):
      super().__init__(embed_dim, num_heads, kernel_size, stride, dilation, is_causal,
                       spatial_dims=n, **kwargs)
  Fixed.__name__ = Fixed.__qualname__ = f"NeighborhoodAttention{n}D"
  Fixed.__doc__ = f"{n}-D neighborhood attention on [batch, {n} spatial dims, embed_dim]."
  return Fixed


NeighborhoodAttention1D = _fixed_dims(1)
NeighborhoodAttention2D = _fixed_dims(2)
NeighborhoodAttention3D = _fixed_dims(3)


class SparseAttention(nnx.Module):
  """Attention over 1-D sequences with any mask, on ``[batch, seq, embed_dim]``.

  ``mask``: a `jax_sparse_attn.masks` spec, e.g. ``causal() & (sliding_window(w) | sink(4))``.
  ``__call__(x, segment_ids=None)``; segment ids [batch, seq] restrict attention to packed
  documents. RoPE positions default to 0..seq-1 (``positions`` [batch, seq] to give others):
  rotary scores depend on q - k positions only, so within a document this equals restarting
  them per document.
  ``context_axis``: a mesh axis that shards the sequence under `jax.set_mesh` (context
  parallelism, `jax_sparse_attn.context_parallel`); ignored without a mesh.
  ``context_layout="zigzag"``: x (and segment ids, labels) come in
  `context_parallel.to_zigzag` order over the context axis, which balances causal work on a
  ring; default RoPE positions follow that order. Needs the mesh.
  ``learned_sinks``: a learned sink logit per head in every row's softmax denominator
  (gpt-oss attention sinks, `attention`'s ``sinks``): the parameter ``core.sinks``
  [heads], zeros at init. ``logits_soft_cap``: scores capped to ``c·tanh(s / c)`` (Gemma 2's
  50; `attention`'s ``logits_soft_cap``).
  """

  def __init__(self, embed_dim: int, num_heads: int, mask: masks_lib.Mask | None = None, *,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               qkv_bias: bool = False, out_bias: bool = False, use_rope: bool = False,
               rope_base: float = 10000.0, qk_norm: bool = False, backend: str = "auto",
               interpret: bool = False, context_axis: str | None = None,
               context_layout: str = "contiguous", learned_sinks: bool = False,
               logits_soft_cap: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.core = _AttentionBase(embed_dim, num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                               use_rope=use_rope, rope_base=rope_base, qk_norm=qk_norm,
                               backend=backend, interpret=interpret, context_axis=context_axis,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               learned_sinks=learned_sinks, logits_soft_cap=logits_soft_cap)
    self.mask, self.context_layout = mask, context_layout
    context_parallel.check_options("auto", context_layout)

  def __call__(self, x, segment_ids=None, positions=None):
    shards = self.core._zigzag_shards(self.context_layout)
    q, k, v = self.core._project_sequence(x, positions, shards)
    if self.core.backend == "dense":
      o = _dense_baseline(q, k, v, causal=True)
    else:
      o = attention(q, k, v, self.mask, segment_ids=segment_ids, backend=self.core.backend,
                    interpret=self.core.interpret, context_axis=self.core.context_axis,
                    context_layout=self.context_layout, sinks=self.core._sinks(),
                    logits_soft_cap=self.core.logits_soft_cap)
    return self.core._output(o)


def attention_fn(mask: masks_lib.Mask | None = None, **attention_kwargs):
  """An ``attention_fn`` for Flax's own attention modules (`flax.nnx.MultiHeadAttention`,
  `flax.linen.MultiHeadDotProductAttention`) that runs `jax_sparse_attn.attention` with the
  mask spec ``mask`` (and `attention`'s keyword arguments: ``backend``, ``sinks``,
  ``logits_soft_cap``, ...): an existing model swaps its attention for block-sparse kernels
  without other changes. Flax's ``is_causal`` adds `masks.causal()`. Flax's dense ``mask``
  array, ``bias``, attention dropout while training and ``sow_weights`` (the weights are
  never formed) are ValueErrors that say so; ``dtype`` casts q, k and v as Flax's does;
  ``precision`` and ``force_fp32_for_softmax`` are moot (the kernels' softmax runs in
  float32). Inputs ``[batch..., length, heads, head_dim]``."""

  spec = mask

  def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
         dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
         is_causal=False, force_fp32_for_softmax=False, **unused):
    del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
    if mask is not None:
      raise ValueError("mask: Flax's dense attention mask is not used; give the mask spec to "
                       "jax_sparse_attn.nn.attention_fn(mask=...) (segment ids for padding "
                       "or packed documents: SparseAttention(...)(x, segment_ids=...))")
    if bias is not None:
      raise ValueError("bias is not supported: a dense attention bias defeats block sparsity")
    if dropout_rate and not deterministic:
      raise ValueError(f"dropout_rate={dropout_rate}: attention dropout is not supported "
                       "(the kernels never form the weights); set it to 0")
    if module is not None:
      raise ValueError("sow_weights: the attention weights are never formed")
    extra = {k: v for k, v in unused.items() if v is not None}
    if extra:
      raise ValueError(f"unsupported attention_fn arguments: {sorted(extra)}")
    full = spec
    if is_causal:
      full = masks_lib.causal() if full is None else full & masks_lib.causal()
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    lead = query.shape[:-3]
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])
    out = attention(flat(query), flat(key), flat(value), full, **attention_kwargs)
    return out.reshape(lead + out.shape[1:])

  return fn


class MixtureOfBlockAttention(nnx.Module):
  """MoBA (mixture of block attention) on ``[batch, seq, embed_dim]``: each query block of
  each head attends to the ``top_k`` key blocks of ``block_size`` tokens whose mean key best
  matches its mean query (`routing.topk_blocks`), plus the ``local_blocks`` blocks ending at
  its own and the first ``sink_blocks``, within a causal mask if ``causal``. The selection
  runs on device in the same jit (no gradient through it). ``shared_by_group``: one selection
  per KV head (its query heads' mean score), shared by the GQA group (NSA). Other arguments as
  `SparseAttention` (GQA, RoPE, qk_norm, segment ids, ``context_axis``: with the sequence
  sharded each device runs its query blocks' selection against all-gathered K/V;
  ``context_layout``: the zigzag order of the causal layers beside it); backend
  "dense" is the causal (or full) `jax.nn.dot_product_attention` baseline;
  ``learned_sinks`` and ``logits_soft_cap`` as in `SparseAttention`.
  """

  def __init__(self, embed_dim: int, num_heads: int, block_size: int, top_k: int, *,
               causal: bool = True, local_blocks: int = 1, sink_blocks: int = 0,
               shared_by_group: bool = False,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               qkv_bias: bool = False, out_bias: bool = False, use_rope: bool = False,
               rope_base: float = 10000.0, qk_norm: bool = False, backend: str = "auto",
               interpret: bool = False, context_axis: str | None = None,
               context_layout: str = "contiguous", learned_sinks: bool = False,
               logits_soft_cap: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    routing._check_block_size(block_size)
    context_parallel.check_options("auto", context_layout)
    self.core = _AttentionBase(embed_dim, num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                               use_rope=use_rope, rope_base=rope_base, qk_norm=qk_norm,
                               backend=backend, interpret=interpret, context_axis=context_axis,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               learned_sinks=learned_sinks, logits_soft_cap=logits_soft_cap)
    self.block_size, self.top_k, self.causal = block_size, top_k, causal
    self.local_blocks, self.sink_blocks = local_blocks, sink_blocks
    if not isinstance(shared_by_group, bool):
      raise ValueError(f"shared_by_group must be a bool, got {shared_by_group!r}")
    self.shared_by_group = shared_by_group
    self.context_layout = context_layout

  def __call__(self, x, segment_ids=None, positions=None):
    shards = self.core._zigzag_shards(self.context_layout)
    q, k, v = self.core._project_sequence(x, positions, shards)
    if self.core.backend == "dense":
      return self.core._output(_dense_baseline(q, k, v, causal=self.causal))
    sel = routing.topk_blocks(q, k, self.block_size, self.top_k, causal=self.causal,
                              local_blocks=self.local_blocks, sink_blocks=self.sink_blocks,
                              zigzag_shards=shards, shared_by_group=self.shared_by_group)
    o = attention(q, k, v, masks_lib.causal() if self.causal else None,
                  segment_ids=segment_ids, block_selection=sel, backend=self.core.backend,
                  interpret=self.core.interpret, context_axis=self.core.context_axis,
                  context_layout=self.context_layout, sinks=self.core._sinks(),
                  logits_soft_cap=self.core.logits_soft_cap)
    return self.core._output(o)


# --------------------------------------------------------------------------------------------
# Linen


from flax import linen as _ln  # noqa: E402


class _LinenBase(_ln.Module):
  embed_dim: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  use_bias: bool = True
  backend: str = "auto"
  interpret: bool = False
  context_axis: str | None = None
  learned_sinks: bool = False
  logits_soft_cap: float | None = None
  dtype: object = None

  def _qkv(self, x):
    h, hkv = self.num_heads, self.num_kv_heads or self.num_heads
    d = self.head_dim or self.embed_dim // self.num_heads
    init = _ln.initializers.lecun_normal()
    dense = lambda n, names, name: _ln.DenseGeneral(
        (n, d), use_bias=self.use_bias, dtype=self.dtype, name=name,
        kernel_init=_ln.with_logical_partitioning(init, ("embed",) + names))
    q = dense(h, ("heads", "head_dim"), "query")(x)
    k = dense(hkv, ("kv_heads", "head_dim"), "key")(x)
    v = dense(hkv, ("kv_heads", "head_dim"), "value")(x)
    return q, k, v

  def _sinks(self):
    """The learned sink logits [heads] (``learned_sinks``), or None."""
    if not self.learned_sinks:
      return None
    init = _ln.with_logical_partitioning(_ln.initializers.zeros_init(), ("heads",))
    return self.param("sinks", init, (self.num_heads,), jnp.float32)

  def _out(self, o):
    return _ln.DenseGeneral(
        self.embed_dim, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype, name="out",
        kernel_init=_ln.with_logical_partitioning(_ln.initializers.lecun_normal(),
                                                  ("heads", "head_dim", "embed")))(o)


class LinenNeighborhoodAttention(_LinenBase):
  """Linen neighborhood attention on [batch, *spatial, embed_dim]."""
  kernel_size: object = 7
  stride: object = 1
  dilation: object = 1
  is_causal: object = False

  @_ln.compact
  def __call__(self, x):
    q, k, v = self._qkv(x)
    o = na(q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal,
           backend=self.backend, interpret=self.interpret, context_axis=self.context_axis,
           sinks=self._sinks(), logits_soft_cap=self.logits_soft_cap)
    return self._out(o)


class LinenSparseAttention(_LinenBase):
  """Linen masked attention on [batch, seq, embed_dim] (``context_layout`` as in the NNX
  `SparseAttention`; no RoPE here)."""
  mask: object = None
  context_layout: str = "contiguous"

  @_ln.compact
  def __call__(self, x, segment_ids=None):
    q, k, v = self._qkv(x)
    o = attention(q, k, v, self.mask, segment_ids=segment_ids, backend=self.backend,
                  interpret=self.interpret, context_axis=self.context_axis,
                  context_layout=self.context_layout, sinks=self._sinks(),
                  logits_soft_cap=self.logits_soft_cap)
    return self._out(o)


class linen:  # noqa: N801  (a namespace: nn.linen.NeighborhoodAttention, ...)
  NeighborhoodAttention = LinenNeighborhoodAttention
  SparseAttention = LinenSparseAttention
