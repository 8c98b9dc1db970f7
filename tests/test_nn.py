"""Flax modules: shapes, partitioning metadata, sharding under a mesh, Linen equivalents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import brute_force
import compiled
import jax_sparse_attn as jsa
from jax_sparse_attn import masks, nn


def test_neighborhood_module_matches_functional_op():
  m = nn.NeighborhoodAttention2D(32, 4, (3, 5), dilation=(1, 2), num_kv_heads=2,
                                 backend="xla", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 11, 32))
  q = m.core.query(x).reshape(2, 7, 11, 4, 8)
  k = m.core.key(x).reshape(2, 7, 11, 2, 8)
  v = m.core.value(x).reshape(2, 7, 11, 2, 8)
  want = m.core.out(compiled.run(
      lambda q, k, v: jsa.na2d(q, k, v, (3, 5), dilation=(1, 2), backend="reference"),
      q, k, v).reshape(2, 7, 11, 32))
  assert brute_force.rel_err(compiled.call(m, x), want) < 1e-4


@pytest.mark.parametrize("cls, shape", [(nn.NeighborhoodAttention1D, (2, 17, 32)),
                                        (nn.NeighborhoodAttention3D, (1, 4, 6, 5, 32))])
def test_rope_qknorm_shapes(cls, shape):
  kernel = 3
  m = cls(32, 2, kernel, use_rope=True, qk_norm=True, backend="xla", rngs=nnx.Rngs(0),
          head_dim=12 if cls is nn.NeighborhoodAttention3D else None)
  assert compiled.call(m, jnp.ones(shape)).shape == shape


def test_rope_is_relative():
  # <rope(q, p), rope(k, p')> depends only on p - p'.
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 16))
  dot = lambda a, b: float(jnp.sum(nn.rope(q, jnp.array([[a]])) * nn.rope(k, jnp.array([[b]]))))
  assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-4)
  assert dot(3, 1) != pytest.approx(dot(3, 2), rel=1e-3)


def test_sparse_attention_module_with_segments():
  mask = masks.causal() & (masks.sliding_window(7) | masks.sink(2))
  m = nn.SparseAttention(32, 4, mask, num_kv_heads=1, use_rope=True, backend="xla",
                         rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 40, 32))
  seg = jnp.asarray(np.repeat([[0, 1]], 20, axis=1).repeat(2, 0), jnp.int32)
  out = m(x, seg)  # eager: the one module call left outside jit here (the rest: `compiled`)
  assert out.shape == x.shape
  np.testing.assert_allclose(compiled.call(m, x, seg), out, atol=1e-6)
  # Documents are independent: changing document 1 leaves document 0's outputs unchanged.
  x2 = x.at[:, 25].add(5.0)
  np.testing.assert_allclose(compiled.call(m, x2, seg)[:, :20], out[:, :20], atol=1e-5)


def test_partitioning_metadata():
  m = nn.NeighborhoodAttention2D(32, 4, 3, rngs=nnx.Rngs(0), backend="xla")
  specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
  assert specs["core"]["query"]["kernel"].get_value() == P("embed", "heads")
  assert specs["core"]["out"]["kernel"].get_value() == P("heads", "embed")
  assert nn.logical_spec(("batch", "length", "heads", "head_dim")) == P("data", "context",
                                                                          "model", None)


def test_sharded_model_under_jit_matches_unsharded():
  assert len(jax.devices()) >= 8, "conftest forces 8 host devices"
  mesh = jax.make_mesh((2, 1, 4), ("data", "context", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 64))
  ref_model = nn.NeighborhoodAttention2D(64, 4, 3, backend="xla", rngs=nnx.Rngs(0))
  want = compiled.call(ref_model, x)
  with jax.set_mesh(mesh):
    model = nn.NeighborhoodAttention2D(64, 4, 3, backend="xla", rngs=nnx.Rngs(0))
    nn.shard_model(model, mesh)
    assert model.core.query.kernel[...].sharding.spec == P(None, "model")
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    out = compiled.call(model, xs)
  assert brute_force.rel_err(out, want) < 1e-5


def test_linen_modules():
  x = jnp.ones((2, 9, 9, 32))
  m = nn.linen.NeighborhoodAttention(embed_dim=32, num_heads=4, kernel_size=3, backend="xla")
  params = jax.jit(m.init)(jax.random.PRNGKey(0), x)
  assert jax.jit(m.apply)(params, x).shape == x.shape
  s = nn.linen.SparseAttention(embed_dim=32, num_heads=4, num_kv_heads=2, mask=masks.causal(),
                               backend="xla")
  y = jnp.ones((2, 21, 32))
  assert jax.jit(s.apply)(jax.jit(s.init)(jax.random.PRNGKey(0), y), y).shape == y.shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=30, num_heads=4), "divisible by num_heads"),
    (dict(embed_dim=32, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
])
def test_module_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nn.SparseAttention(rngs=nnx.Rngs(0), **kwargs)


def test_module_input_validation():
  layer = nn.NeighborhoodAttention2D(32, 2, 3, backend="xla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="last dim must be embed_dim = 32"):
    layer(jnp.ones((1, 8, 8, 24)))
  with pytest.raises(ValueError, match="x must be \\[batch, 2 spatial dims, embed_dim\\]"):
    layer(jnp.ones((1, 8, 32)))
  with pytest.raises(ValueError, match="last dim must be embed_dim = 32"):
    nn.SparseAttention(32, 2, backend="xla", rngs=nnx.Rngs(0))(jnp.ones((1, 8, 16)))


def test_context_parallel_modules_match_single_device():
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 6, 32))
  y = jax.random.normal(jax.random.PRNGKey(8), (2, 64, 32))
  seg = jnp.asarray(np.repeat([[0, 1]], 32, axis=1).repeat(2, 0), jnp.int32)
  mask = masks.causal() & masks.sliding_window(9)
  make_na = lambda axis: nn.NeighborhoodAttention2D(32, 4, (3, 5), is_causal=(True, False),
                                                    backend="xla", context_axis=axis,
                                                    rngs=nnx.Rngs(0))
  make_lm = lambda axis: nn.SparseAttention(32, 4, mask, num_kv_heads=2, use_rope=True,
                                            backend="xla", context_axis=axis, rngs=nnx.Rngs(0))
  want_na, want_lm = compiled.call(make_na(None), x), compiled.call(make_lm(None), y, seg)
  # No mesh: the context axis is ignored.
  assert brute_force.rel_err(compiled.call(make_na("context"), x), want_na) < 1e-5
  with jax.set_mesh(mesh):
    na_model, lm_model = make_na("context"), make_lm("context")
    got_na = compiled.call(na_model, x)
    got_lm = compiled.call(lm_model, y, seg)
    grads = compiled.grad(lambda m: jnp.sum(m(y, seg) ** 2))(lm_model)
  assert brute_force.rel_err(got_na, want_na) < 1e-5
  assert brute_force.rel_err(got_lm, want_lm) < 1e-5
  want_grads = compiled.grad(lambda m: jnp.sum(m(y, seg) ** 2))(make_lm(None))
  assert brute_force.rel_err(grads["core"]["query"]["kernel"][...],
                             want_grads["core"]["query"]["kernel"][...]) < 1e-4
  lin = nn.linen.SparseAttention(embed_dim=32, num_heads=4, mask=mask, backend="xla",
                                 context_axis="context")
  params = jax.jit(lin.init)(jax.random.PRNGKey(0), y)
  with jax.set_mesh(mesh):
    got = jax.jit(lin.apply)(params, y)
  assert brute_force.rel_err(got, jax.jit(lin.apply)(params, y)) < 1e-5


@pytest.mark.parametrize("kind", ["causal", pytest.param("moba", marks=pytest.mark.extended)])
def test_zigzag_layout_modules(kind):
  """context_layout="zigzag": inputs in `to_zigzag` order give the zigzag order of the
  single-device output (RoPE positions follow the tokens' order; MoBA's selection runs in
  sequence order), forward and parameter gradients; without a mesh a ValueError."""
  from jax_sparse_attn import context_parallel as cp
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  y = jax.random.normal(jax.random.PRNGKey(9), (2, 128, 32))
  seg = jnp.asarray(np.repeat([[0, 1]], 64, axis=1).repeat(2, 0), jnp.int32)
  make = lambda layout, axis: (
      nn.SparseAttention(32, 4, masks.causal(), num_kv_heads=2, use_rope=True, backend="xla",
                         context_axis=axis, context_layout=layout, rngs=nnx.Rngs(0))
      if kind == "causal" else
      nn.MixtureOfBlockAttention(32, 4, 16, 2, num_kv_heads=2, use_rope=True, backend="xla",
                                 context_axis=axis, context_layout=layout, rngs=nnx.Rngs(0)))
  loss = lambda m, y, s: jnp.sum(m(y, s) ** 2)
  single = make("contiguous", None)
  want, want_grads = compiled.call(single, y, seg), compiled.grad(loss)(single, y, seg)
  z = lambda x: cp.to_zigzag(x, 4)
  with jax.set_mesh(mesh):
    model = make("zigzag", "context")
    got = compiled.call(model, z(y), z(seg))
    grads = compiled.grad(loss)(model, z(y), z(seg))
  assert brute_force.rel_err(cp.from_zigzag(got, 4), want) < 1e-5
  assert brute_force.rel_err(grads["core"]["query"]["kernel"][...],
                             want_grads["core"]["query"]["kernel"][...]) < 1e-4
  with pytest.raises(ValueError, match="context_layout='zigzag' needs a context_axis"):
    make("zigzag", "context")(y, seg)


def test_dense_baseline_backend_equals_full_neighborhood():
  # A kernel as large as the map is full attention: the "dense" speed baseline must agree.
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 7, 32))
  dense = nn.NeighborhoodAttention2D(32, 4, (6, 7), backend="dense", rngs=nnx.Rngs(0))
  sparse = nn.NeighborhoodAttention2D(32, 4, (6, 7), backend="xla", rngs=nnx.Rngs(0))
  assert brute_force.rel_err(compiled.call(dense, x), compiled.call(sparse, x)) < 1e-4
  lm_dense = nn.SparseAttention(32, 4, masks.causal(), backend="dense", rngs=nnx.Rngs(0))
  lm_sparse = nn.SparseAttention(32, 4, masks.causal(), backend="xla", rngs=nnx.Rngs(0))
  y = jax.random.normal(jax.random.PRNGKey(6), (2, 19, 32))
  assert brute_force.rel_err(compiled.call(lm_dense, y), compiled.call(lm_sparse, y)) < 1e-4


def test_neighborhood_module_with_extra_tokens():
  # A text-to-image block: image tokens attend to their neighborhood and to the text tokens
  # (own projections), padded text masked; the dense baseline agrees where the kernel is full.
  m = nn.NeighborhoodAttention2D(32, 4, 3, num_kv_heads=2, qk_norm=True, extra_dim=24,
                                 backend="xla", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 32))
  text = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 24))
  text_valid = jnp.arange(7)[None, :] < jnp.array([[7], [4]])

  def reference(m, x, text, text_valid):
    q, k, v = m.core._project(x, None)
    ek, ev = m._extra_kv(text, 2)
    return m.core.out(jsa.na2d(q, k, v, 3, additional_keys=ek, additional_values=ev,
                               additional_valid=text_valid, backend="reference")
                      .reshape(2, 5, 6, 32))

  want = nnx.jit(reference)(m, x, text, text_valid)
  assert brute_force.rel_err(compiled.call(m, x, text, text_valid), want) < 1e-4
  # Gradients reach the text projections.
  grads = compiled.grad(lambda m: jnp.sum(m(x, text, text_valid) ** 2))(m)
  assert float(jnp.abs(grads.extra_key.kernel[...]).sum()) > 0
  full = nn.NeighborhoodAttention2D(32, 4, (5, 6), extra_dim=24, backend="dense",
                                    rngs=nnx.Rngs(0))
  sparse = nn.NeighborhoodAttention2D(32, 4, (5, 6), extra_dim=24, backend="xla",
                                      rngs=nnx.Rngs(0))
  assert brute_force.rel_err(compiled.call(full, x, text), compiled.call(sparse, x, text)) < 1e-4
  with pytest.raises(ValueError, match="extra_dim="):
    nn.NeighborhoodAttention2D(32, 4, 3, backend="xla", rngs=nnx.Rngs(0))(x, text)
  with pytest.raises(ValueError, match="extra_tokens must be"):
    m(x, text[..., :20])
  with pytest.raises(ValueError, match="extra_valid needs extra_tokens"):
    m(x, extra_valid=text_valid)
  with pytest.raises(ValueError, match="extra_dim must be positive"):
    nn.NeighborhoodAttention2D(32, 4, 3, extra_dim=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="takes no kv_valid"):
    full(x, text, kv_valid=jnp.ones((2, 5, 6), bool))


def test_mixture_of_block_attention_matches_functional_ops():
  m = nn.MixtureOfBlockAttention(32, 4, 16, 2, num_kv_heads=2, use_rope=True, backend="xla",
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 70, 32))
  seg = jnp.asarray(np.arange(70)[None, :] >= np.array([[30], [50]]), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(70), (2, 70))[..., None]
  from jax_sparse_attn import routing

  def reference(m, x, seg):
    q, k, v = m.core._project(x, pos)
    sel = routing.topk_blocks(q, k, 16, 2, causal=True, local_blocks=1)
    return m.core._output(jsa.attention(q, k, v, masks.causal(), segment_ids=seg,
                                        block_selection=sel, backend="xla"))

  want = nnx.jit(reference)(m, x, seg)
  assert brute_force.rel_err(compiled.call(m, x, seg), want) < 1e-5
  # One selection per KV head, shared by its query heads (NSA): the same weights, the
  # group's mean score; not the per-head selection.
  shared = nn.MixtureOfBlockAttention(32, 4, 16, 2, num_kv_heads=2, use_rope=True,
                                      shared_by_group=True, backend="xla", rngs=nnx.Rngs(0))

  def reference_shared(m, x, seg):
    q, k, v = m.core._project(x, pos)
    sel = routing.topk_blocks(q, k, 16, 2, causal=True, local_blocks=1, shared_by_group=True)
    assert sel.ids.shape[1] == 2
    return m.core._output(jsa.attention(q, k, v, masks.causal(), segment_ids=seg,
                                        block_selection=sel, backend="xla"))

  got = compiled.call(shared, x, seg)
  assert brute_force.rel_err(got, nnx.jit(reference_shared)(shared, x, seg)) < 1e-5
  assert brute_force.rel_err(got, want) > 1e-3
  with pytest.raises(ValueError, match="shared_by_group must be a bool"):
    nn.MixtureOfBlockAttention(32, 4, 16, 2, shared_by_group=1, rngs=nnx.Rngs(0))
  # A top_k covering every block is plain causal attention.
  full = nn.MixtureOfBlockAttention(32, 4, 16, 8, backend="xla", rngs=nnx.Rngs(0))
  dense = nn.SparseAttention(32, 4, masks.causal(), backend="xla", rngs=nnx.Rngs(0))
  assert brute_force.rel_err(compiled.call(full, x), compiled.call(dense, x)) < 1e-5
  with pytest.raises(ValueError, match="block_size must be"):
    nn.MixtureOfBlockAttention(32, 4, 24, 2, rngs=nnx.Rngs(0))


def test_soft_cap_modules():
  """`logits_soft_cap` on the NNX and Linen layers equals the functional op with the cap,
  and differs from the layer without it."""
  rngs = lambda: nnx.Rngs(0)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 40, 32)) * 4
  layer = nn.SparseAttention(32, 4, masks.causal(), logits_soft_cap=0.5, backend="xla",
                             rngs=rngs())
  plain = nn.SparseAttention(32, 4, masks.causal(), backend="xla", rngs=rngs())

  def reference(layer, x):
    q, k, v = layer.core._project_sequence(x, None, None)
    return layer.core._output(jsa.attention(q, k, v, masks.causal(), backend="reference",
                                            logits_soft_cap=0.5))

  got = compiled.call(layer, x)
  np.testing.assert_allclose(got, nnx.jit(reference)(layer, x), atol=1e-5)
  assert float(jnp.abs(got - compiled.call(plain, x)).max()) > 1e-3
  na_layer = nn.NeighborhoodAttention2D(32, 4, 3, logits_soft_cap=0.5, backend="xla",
                                        rngs=rngs())
  assert compiled.call(na_layer, x.reshape(1, 5, 8, 32)).shape == (1, 5, 8, 32)
  lin = nn.linen.SparseAttention(32, 4, mask=masks.causal(), backend="xla", logits_soft_cap=0.5)
  params = jax.jit(lin.init)(jax.random.PRNGKey(0), x)
  lin_plain = nn.linen.SparseAttention(32, 4, mask=masks.causal(), backend="xla")
  assert float(jnp.abs(jax.jit(lin.apply)(params, x)
                       - jax.jit(lin_plain.apply)(params, x)).max()) > 1e-3
  with pytest.raises(ValueError, match="logits_soft_cap"):
    nn.SparseAttention(32, 4, logits_soft_cap=5.0, backend="dense", rngs=rngs())


def test_attention_fn_in_flax_modules():
  """`nn.attention_fn(mask)` in Flax's own attention modules equals those modules with the
  same mask as a dense array: nnx.MultiHeadAttention (its ``is_causal`` adds causal; output
  and gradients, two batch dims) and linen.MultiHeadDotProductAttention; what it cannot do
  is a ValueError that says so."""
  from flax import linen
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 40, 32))
  n = 40
  window = (jnp.arange(n)[:, None] - jnp.arange(n)[None, :]) <= 6
  dense = (nnx.make_causal_mask(jnp.ones((2, 3, n))) > 0) & window
  make = lambda **kw: nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0), **kw)
  ref, ours = make(), make(attention_fn=nn.attention_fn(masks.sliding_window(6),
                                                         backend="xla"))
  loss = lambda m, x, **kw: jnp.sum(jnp.sin(m(x, **kw)))
  x_grad = lambda m, x, **kw: jax.grad(lambda x: loss(m, x, **kw))(x)
  np.testing.assert_allclose(compiled.call(ours, x, is_causal=True),
                             compiled.call(ref, x, mask=dense), atol=1e-5)
  np.testing.assert_allclose(nnx.jit(lambda m, x: x_grad(m, x, is_causal=True))(ours, x),
                             nnx.jit(x_grad)(ref, x, mask=dense), atol=1e-5)
  lin = linen.MultiHeadDotProductAttention(4, attention_fn=nn.attention_fn(masks.causal(),
                                                                           backend="xla"))
  lin_ref = linen.MultiHeadDotProductAttention(4)
  y = x[0]
  params = jax.jit(lin_ref.init)(jax.random.PRNGKey(1), y)
  np.testing.assert_allclose(jax.jit(lin.apply)(params, y),
                             jax.jit(lin_ref.apply)(params, y,
                                                    mask=linen.make_causal_mask(y[..., 0])),
                             atol=1e-5)
  fn = nn.attention_fn(masks.causal())
  q = jnp.zeros((1, 8, 2, 16))
  for kw, match in [(dict(mask=jnp.ones((1, 2, 8, 8), bool)), "dense attention mask"),
                    (dict(bias=jnp.zeros((1, 2, 8, 8))), "bias is not supported"),
                    (dict(dropout_rate=0.1), "attention dropout is not supported"),
                    (dict(module=object()), "sow_weights"),
                    (dict(qk_attn_weights_einsum=object()), "unsupported attention_fn")]:
    with pytest.raises(ValueError, match=match):
      fn(q, q, q, **kw)
  fn(q, q, q, dropout_rate=0.1, deterministic=True)  # evaluation: no dropout to do
