"""Learned attention sinks (`attention(..., sinks=)`, `na(..., sinks=)`, the modules'
``learned_sinks``) vs the float64 brute force with one more softmax column per head: forward,
lse and gradients of q, k, v and the sinks, on every backend (Pallas kernels in interpret
mode), on a mesh with a context axis, and bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_cases
import brute_force
import compiled
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn import nn as jnn

AUTO = jax.sharding.AxisType.Auto


def _sinks(rng, heads, scalar):
  return (jnp.float32(rng.standard_normal() * 2) if scalar else
          jnp.asarray(rng.standard_normal(heads) * 2, jnp.float32))


def _check(run, q, k, v, d_out, sinks, want, want_lse, want_grads, tol, scales):
  """``scales``: the brute force's error scales (`brute_force.attention_with_sinks`)."""
  (out, lse), grads = backend_cases.outputs_and_grads(run, d_out, q, k, v, sinks)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert brute_force.rel_err(out, want) < tol
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=tol * 10, rtol=tol)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads[:3])
  backend_cases.assert_grads(grads[:3], want_grads[:3], scales["grads"], tol, q.dtype)
  # The sinks' gradient sums terms of both signs (-p_sink · rowsum(dO ∘ O) per row): its
  # error against the terms' magnitude, plus what rounding P and O to the inputs' dtype (a
  # unit roundoff, eps / 4, each) moves a rowsum that cancels by (the brute force's
  # "products"; 2026-12-07's sweeps saw up to 0.9e-3 of it in bfloat16, eps / 2 = 3.9e-3).
  scalar = np.ndim(grads[3]) == 0
  terms, products = (np.sum(x) if scalar else x for x in (scales["terms"], scales["products"]))
  err = np.abs(np.asarray(grads[3], np.float64) - (np.sum(want_grads[3]) if scalar
                                                   else want_grads[3]))
  bound = tol * (terms + 1e-3) + float(jnp.finfo(q.dtype).eps) / 2 * products
  assert np.all(err <= bound), ("d_sinks", err, terms, products)


def _check_sequence(p, backend, scalar=False, **kw):
  q, k, v, d_out, rng = backend_cases.make_inputs(p)
  sq, skv = p["sq"], p["skv"]
  mask = backend_cases.seq_mask(p["mask"], sq, skv)
  seg = None
  if p["segments"]:
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (p["batch"], sq)), axis=1), jnp.int32)
  sinks = _sinks(rng, p["heads"], scalar)
  dense = np.asarray(mask(np.arange(sq)[:, None], np.arange(skv)[None, :]))
  scale = 1.0 / math.sqrt(p["head_dim"])
  want, want_lse, want_grads, scales = brute_force.attention_with_sinks(
      q, k, v, dense, scale, sinks, d_out, seg, seg)
  run = lambda q, k, v, s: jsa.attention(q, k, v, mask, segment_ids=seg, backend=backend,
                                         sinks=s, return_lse=True, **kw)
  _check(run, q, k, v, d_out, sinks, want, want_lse, want_grads, backend_cases.TOL[p["dtype"]],
         scales)


@settings(max_examples=examples(10))
@given(p=backend_cases.seq_problems(dtypes=(jnp.float32, jnp.bfloat16)),
       backend=st.sampled_from(["reference", "xla"]), scalar=st.booleans())
def test_sinks_randomized(p, backend, scalar):
  _check_sequence(p, backend, scalar)


def test_rows_that_see_nothing_keep_zero_output_and_the_sink_lse():
  """A row with no visible key: output zero, lse = the sink, zero gradients (never NaN)."""
  p = dict(batch=1, sq=12, skv=12, heads=2, kv_heads=1, head_dim=16, mask="masked_rows",
           segments=False, dtype=jnp.float32, seed=1)
  _check_sequence(p, "xla")
  q, k, v, _, _ = backend_cases.make_inputs(p)
  sinks = jnp.asarray([0.5, -2.0])
  out, lse = jsa.attention(q, k, v, masks.causal(offset=-5), backend="xla", sinks=sinks,
                           return_lse=True)
  assert np.all(np.asarray(out)[:, :5] == 0)
  np.testing.assert_array_equal(np.asarray(lse)[0, :5], np.broadcast_to(sinks, (5, 2)))


@pytest.mark.parametrize("backend, kw", [
    ("triton", dict(interpret=True, block_q=16, block_kv=16)),
    ("mosaic", dict(interpret=True)),
    ("mosaic_gpu", dict(interpret=True)),
])
def test_sinks_kernels_interpret(backend, kw):
  """The kernels' backward with the sinks' lse cotangent (d_lse), GQA and a sliding window
  with a sink token."""
  seq = 256 if backend == "mosaic_gpu" else 48
  p = dict(batch=1, sq=seq, skv=seq, heads=2, kv_heads=1,
           head_dim=64 if backend == "mosaic_gpu" else 32, mask="window_sink",
           segments=backend != "mosaic", dtype=jnp.bfloat16 if backend == "mosaic_gpu"
           else jnp.float32, seed=3)
  _check_sequence(p, backend, **kw)


def test_na_sinks():
  """`na` with sinks (2-D, strided, a causal dim) and with extra tokens merged by lse."""
  spatial, kernel, stride, dilation, causal = (5, 6), (3, 4), (1, 2), (1, 1), (True, False)
  p = dict(batch=2, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32, seed=2)
  q, k, v, d_out, rng = backend_cases.make_inputs(p, spatial)
  sinks = _sinks(rng, 2, False)
  n = math.prod(spatial)
  flat = lambda x: x.reshape(x.shape[0], n, *x.shape[-2:])
  dense = brute_force.gna_mask(spatial, kernel, stride, dilation, causal)
  want, want_lse, (dq, dk, dv, ds), scales = brute_force.attention_with_sinks(
      flat(q), flat(k), flat(v), dense, 0.25, sinks, flat(d_out))
  shape = lambda x: x.reshape(q.shape[:-1] + x.shape[-1:]) if x.ndim == 4 else x
  for backend, kw in (("xla", {}), ("triton", dict(interpret=True))):
    run = lambda q, k, v, s: jsa.na(q, k, v, kernel, stride, dilation, causal, sinks=s,
                                    backend=backend, return_lse=True, **kw)
    _check(run, q, k, v, d_out, sinks, shape(want), want_lse.reshape(q.shape[:-1]),
           [shape(dq), dk.reshape(k.shape), dv.reshape(v.shape), ds], 2e-4, scales)


def test_sinks_with_context_parallel():
  """Sinks on the merged rows of a sharded sequence (ring, zigzag) equal one device."""
  mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(AUTO,) * 2)
  rng = np.random.default_rng(0)
  q, k, v, d_out = (jnp.asarray(rng.standard_normal((2, 64, 4, 16)), jnp.float32)
                    for _ in range(4))
  sinks = jnp.asarray(rng.standard_normal(4), jnp.float32)
  mask = masks.causal() & masks.sliding_window(20)
  loss = lambda fn: jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(fn(*a) * d_out), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
  want = loss(lambda q, k, v, s: jsa.attention(q, k, v, mask, backend="xla", sinks=s))
  for layout in ("contiguous", "zigzag"):
    order = (lambda x: jsa.context_parallel.to_zigzag(x, 4)) if layout == "zigzag" else (
        lambda x: x)
    back = (lambda x: jsa.context_parallel.from_zigzag(x, 4)) if layout == "zigzag" else (
        lambda x: x)
    got = loss(lambda q, k, v, s: back(jsa.attention(
        order(q), order(k), order(v), mask, backend="xla", sinks=s, mesh=mesh,
        context_axis="context", strategy="ring", context_layout=layout)))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def test_sinks_change_the_output():
  """A large sink takes the probability mass; a very negative one changes nothing."""
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 16)), jnp.float32) for _ in range(3))
  plain = jsa.attention(q, k, v, masks.causal(), backend="xla")
  low = jsa.attention(q, k, v, masks.causal(), backend="xla", sinks=jnp.full((2,), -1e4))
  high = jsa.attention(q, k, v, masks.causal(), backend="xla", sinks=1e4)
  np.testing.assert_allclose(low, plain, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(high).max()) < 1e-6


@pytest.mark.parametrize("sinks, rule", [
    (jnp.zeros((3,)), r"shape \[heads\] = \[2\]"),
    (jnp.zeros((1, 2)), r"shape \[heads\]"),
    (jnp.zeros((2,), jnp.int32), "float"),
    ("0.5", "float scalar"),
])
def test_bad_sinks(sinks, rule):
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="sinks must be.*" + rule):
    jsa.attention(q, q, q, backend="xla", sinks=sinks)
  with pytest.raises(ValueError, match="sinks must be"):
    jsa.na(q, q, q, 3, backend="xla", sinks=sinks)


def test_modules_learn_sinks():
  """`learned_sinks=True`: a [heads] parameter (zeros, sharded like the heads) that gets
  gradients; the layer equals `attention(..., sinks=)` with it."""
  layer = jnn.SparseAttention(32, 4, masks.causal(), num_kv_heads=2, learned_sinks=True,
                                 backend="xla", rngs=nnx.Rngs(0))
  assert layer.core.sinks[...].shape == (4,) and not np.any(layer.core.sinks[...])
  spec = nnx.get_partition_spec(nnx.state(layer)).core.sinks.get_value()
  assert spec == jax.sharding.PartitionSpec("heads")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 32)), jnp.float32)
  layer.core.sinks[...] = jnp.asarray([0.0, 1.0, -1.0, 2.0])
  grads = compiled.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert float(jnp.abs(grads.core.sinks[...]).min()) > 0

  def reference(layer, x):
    q, k, v = layer.core._project_sequence(x, None)
    return layer.core._output(jsa.attention(q, k, v, masks.causal(), backend="xla",
                                            sinks=layer.core.sinks[...]))

  np.testing.assert_allclose(compiled.call(layer, x), nnx.jit(reference)(layer, x), rtol=1e-6)
  na_layer = jnn.NeighborhoodAttention2D(32, 4, 3, learned_sinks=True, backend="xla",
                                            rngs=nnx.Rngs(0))
  assert compiled.call(na_layer, jnp.ones((1, 5, 5, 32))).shape == (1, 5, 5, 32)
  linen = jnn.linen.SparseAttention(32, 4, mask=masks.causal(), learned_sinks=True,
                                    backend="xla")
  params = jax.jit(linen.init)(jax.random.PRNGKey(0), x)
  assert params["params"]["sinks"].value.shape == (4,)
  with pytest.raises(ValueError, match="learned_sinks"):
    jnn.SparseAttention(32, 4, learned_sinks=True, backend="dense", rngs=nnx.Rngs(0))


def test_routed_sinks():
  """Sinks with a content-routed selection (rows that select nothing see only the sink)."""
  from jax_sparse_attn import routing
  from test_routing import dense_selected
  p = dict(batch=1, sq=40, skv=40, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32, seed=6)
  q, k, v, d_out, rng = backend_cases.make_inputs(p)
  ids = rng.integers(-1, 5, (1, 2, 5, 2)).astype(np.int32)
  ids[0, 0, 1] = -1
  sel = routing.BlockSelection(jnp.asarray(ids), 8)
  m = dense_selected(ids, 40, 40, 8) & np.tril(np.ones((40, 40), bool))[None, None]
  sinks = _sinks(rng, 2, False)
  want, want_lse, want_grads, scales = brute_force.attention_with_sinks(q, k, v, m, 0.25,
                                                                       sinks, d_out)
  run = lambda q, k, v, s: jsa.attention(q, k, v, masks.causal(), block_selection=sel, sinks=s,
                                         backend="xla", return_lse=True)
  _check(run, q, k, v, d_out, sinks, want, want_lse, want_grads, 2e-4, scales)


def test_kernels_join_sinks_and_lower():
  """The kernel backends join sinks in their forward's epilogue (`Backend.sinks`): the op
  runs no pass over the output after the kernel, and it lowers for CUDA (Triton, Mosaic
  GPU) and TPU on this machine, gradients included."""
  from jax_sparse_attn.backends import get_backend
  from pallas_kernels.gpu import export_for_gpu
  from pallas_kernels.tpu import export_for_tpu
  assert all(get_backend(b).sinks for b in ("xla", "triton", "mosaic_gpu", "mosaic"))
  S = jax.ShapeDtypeStruct
  mask = masks.causal() & masks.sliding_window(256)
  q, kv, s = S((1, 1024, 4, 128), jnp.bfloat16), S((1, 1024, 2, 128), jnp.bfloat16), S(
      (4,), jnp.float32)
  # Reductions outside the kernels: rowsum(dO ∘ O) (or a dot) and, with sinks, their
  # gradient's sum, never a second rowsum (`Backend.sinks`: the op folds it into d_lse).
  reductions = lambda text: sum(text.count(op) for op in ("stablehlo.reduce(",
                                                          "stablehlo.dot_general"))
  for backend, export in (("triton", export_for_gpu), ("mosaic_gpu", export_for_gpu),
                          ("mosaic", export_for_tpu)):
    counts = []
    for with_sinks in (True, False):
      loss = lambda q, k, v, s, with_sinks=with_sinks: jnp.sum(jsa.attention(
          q, k, v, mask, backend=backend, sinks=s if with_sinks else None).astype(jnp.float32))
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
      counts.append(reductions(export(grad, q, kv, kv, s).mlir_module()))
    assert counts[0] == counts[1] + 1, (backend, counts)
    # The forward alone: the kernel's output is the op's (no exp of the lse after the call;
    # the kernels' own code is serialized in other dialects).
    fwd = jax.jit(lambda q, k, v, s: jsa.attention(q, k, v, mask, backend=backend, sinks=s))
    text = export(fwd, q, kv, kv, s).mlir_module()
    assert "stablehlo.exponential" not in text, backend


def test_backends_without_sinks_join_them_after_the_kernel():
  """A registered backend that does not take sinks (`Backend.sinks` False) gets them joined
  to its output and lse by the op: same values and gradients."""
  from jax_sparse_attn import backends
  xla = backends.get_backend("xla")
  backends.register_backend("xla_no_sinks", xla._replace(sinks=False))
  try:
    monkey = pytest.MonkeyPatch()
    monkey.setattr(backends, "BACKENDS", backends.BACKENDS + ("xla_no_sinks",))
    from jax_sparse_attn import ops
    monkey.setattr(ops, "BACKENDS", backends.BACKENDS)
    p = dict(batch=2, sq=40, skv=40, heads=4, kv_heads=2, head_dim=16, mask="window_sink",
             segments=True, dtype=jnp.float32, seed=7)
    _check_sequence(p, "xla_no_sinks")
  finally:
    monkey.undo()
    backends._REGISTRY.pop("xla_no_sinks")


def test_sinks_on_a_mesh_of_batch_and_heads():
  """Batch and heads sharded (no context axis): each device's kernels join its heads'
  sinks; equals one device, segment ids too, and the sinks' gradient sums over the batch
  shards."""
  rng = np.random.default_rng(5)
  q, k, v, d_out = (jnp.asarray(rng.standard_normal((4, 48, 4, 16)), jnp.float32)
                    for _ in range(4))
  sinks = jnp.asarray(rng.standard_normal(4), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (4, 48)), axis=1), jnp.int32)
  mask = masks.causal() & masks.sliding_window(20)
  loss = lambda fn: jax.jit(jax.value_and_grad(
      lambda *a: jnp.sum(fn(*a) * d_out), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
  want = loss(lambda q, k, v, s: jsa.attention(q, k, v, mask, segment_ids=seg, backend="xla",
                                               sinks=s))
  for types in ((AUTO, AUTO), (jax.sharding.AxisType.Explicit,) * 2):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=types)
    got = loss(lambda q, k, v, s: jsa.attention(q, k, v, mask, segment_ids=seg, backend="xla",
                                                sinks=s, mesh=mesh))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
