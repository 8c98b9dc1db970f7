"""The public ops on the reference and XLA backends vs the float64 brute force."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_cases
import brute_force
import compiled
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn import masks


@pytest.mark.parametrize("backend", ["reference", "xla"])
@given(p=backend_cases.seq_problems())
def test_attention_fp32(backend, p):
  kwargs = {} if backend == "reference" else dict(block_q=16, block_kv=16)
  backend_cases.check_attention(p, backend, **kwargs)


@settings(max_examples=examples(4))
@given(p=backend_cases.seq_problems(max_len=40, dtypes=(jnp.bfloat16, jnp.float16)))
def test_attention_low_precision_xla(p):
  backend_cases.check_attention(p, "xla", block_q=16, block_kv=16)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@given(p=backend_cases.na_problems())
def test_na(backend, p):
  backend_cases.check_na(p, backend)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@settings(max_examples=examples(4))
@given(p=backend_cases.seq_problems(), cap=st.sampled_from([0.3, 1.0, 4.0]))
def test_soft_cap(backend, p, cap):
  """`logits_soft_cap`: scores cap·tanh(s / cap) before the mask, forward, lse and gradients
  against the capped float64 brute force (every mask, GQA, segment ids, rows that see
  nothing)."""
  kwargs = {} if backend == "reference" else dict(block_q=16, block_kv=16)
  backend_cases.check_attention(p, backend, logits_soft_cap=cap, **kwargs)


@settings(max_examples=examples(3))
@given(p=backend_cases.na_problems(), cap=st.sampled_from([0.5, 2.0]))
def test_na_soft_cap(p, cap):
  backend_cases.check_na(p, "xla", logits_soft_cap=cap)


def test_soft_cap_paths():
  """The cap reaches every path of the ops: extra tokens, content-routed maps, `na_tiling`
  and packed grids give what the capped reference gives; and it changes the result."""
  rng = np.random.default_rng(0)
  x = lambda *s: jnp.asarray(rng.standard_normal(s) * 2, jnp.float32)
  q, k, v = x(1, 6, 7, 4, 16), x(1, 6, 7, 2, 16), x(1, 6, 7, 2, 16)
  ek, ev = x(1, 5, 2, 16), x(1, 5, 2, 16)
  cap = 0.8
  ref = compiled.run(lambda q, k, v: jsa.na(q, k, v, 3, backend="reference",
                                            logits_soft_cap=cap), q, k, v)
  extra = compiled.run(lambda q, k, v, ek, ev: jsa.na(
      q, k, v, 3, additional_keys=ek, additional_values=ev, backend="xla",
      logits_soft_cap=cap), q, k, v, ek, ev)
  # the extra tokens' pass is capped too: against one dense capped attention over both
  flat = lambda t: t.reshape(1, 42, *t.shape[-2:])
  union = masks.from_function(lambda i, j: (j >= 42) | masks.neighborhood((6, 7), 3)(
      i, jnp.minimum(j, 41)))
  both = compiled.run(lambda q, k, v, ek, ev: jsa.attention(
      flat(q), jnp.concatenate([flat(k), ek], 1), jnp.concatenate([flat(v), ev], 1), union,
      backend="reference", logits_soft_cap=cap), q, k, v, ek, ev)
  assert brute_force.rel_err(flat(extra), both) < 1e-5
  tiling = jsa.na_tiling((6, 7), 3, tile_shape=(2, 4))
  tiled = compiled.run(lambda q, k, v: tiling.untile(jsa.na(
      tiling.tile(q), tiling.tile(k), tiling.tile(v), 3, tiling=tiling, backend="xla",
      logits_soft_cap=cap)), q, k, v)
  assert brute_force.rel_err(tiled, ref) < 1e-5
  uncapped = compiled.run(lambda q, k, v: jsa.na(q, k, v, 3, backend="xla"), q, k, v)
  assert brute_force.rel_err(uncapped, ref) > 0.05
  packed = compiled.run(lambda q, k, v: jsa.na_packed(
      flat(q), flat(k), flat(v), [(6, 7)], 3, method="tiled", backend="xla",
      logits_soft_cap=cap), q, k, v)
  assert brute_force.rel_err(packed, flat(ref)) < 1e-5
  from jax_sparse_attn import routing
  qs, ks, vs = x(1, 64, 2, 16), x(1, 64, 2, 16), x(1, 64, 2, 16)
  sel = compiled.run(lambda q, k: routing.topk_blocks(q, k, block_size=16, top_k=1,
                                                      causal=True), qs, ks)
  routed = compiled.run(lambda q, k, v, sel: jsa.attention(
      q, k, v, masks.causal(), block_selection=sel, backend="xla", logits_soft_cap=cap),
      qs, ks, vs, sel)
  ids = np.asarray(sel.ids)  # [b, h, q blocks, k]: the same selection as a dense mask
  dense = np.zeros((2, 64, 64), bool)
  for h in range(2):
    for i in range(4):
      for j in ids[0, h, i]:
        if j >= 0:
          dense[h, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] = True
  dense &= np.tril(np.ones((64, 64), bool))
  want, _ = brute_force.attention(qs, ks, vs, dense[None], 0.25, cap=cap)
  assert brute_force.rel_err(routed, want) < 1e-5
  # with learned sinks (not capped: a logit of their own), joined in the XLA kernel's epilogue
  sunk = lambda backend: compiled.run(jax.grad(lambda q: jnp.sum(jsa.attention(
      q, ks, vs, masks.causal(), sinks=jnp.asarray([0.5, -1.0]), logits_soft_cap=cap,
      backend=backend) ** 2)), qs)
  assert brute_force.rel_err(sunk("xla"), sunk("reference")) < 1e-5


def test_fully_masked_rows_are_zero_not_nan():
  q = k = v = jnp.ones((1, 20, 2, 16))
  mask = masks.causal(offset=-5)
  for backend in ("reference", "xla"):
    out, lse = compiled.run(lambda q: jsa.attention(q, k, v, mask, backend=backend,
                                                    return_lse=True), q)
    assert np.all(np.asarray(out[:, :5]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :5])))
    g = compiled.run(jax.grad(lambda q: jnp.sum(jsa.attention(q, k, v, mask,
                                                              backend=backend))), q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_lse_gradient_matches_reference():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 33, 2, 16)), jnp.float32) for _ in range(3))
  mask = masks.sliding_window(5, 5)

  def loss(backend):
    def f(q, k, v):
      out, lse = jsa.attention(q, k, v, mask, backend=backend, return_lse=True)
      return jnp.sum(out) + jnp.sum(jnp.sin(lse))
    return compiled.run(jax.grad(f, argnums=(0, 1, 2)), q, k, v)

  for a, b in zip(loss("xla"), loss("reference")):
    assert brute_force.rel_err(a, b) < 1e-4


def test_na_functions_dispatch_on_rank():
  x = jnp.ones((1, 8, 8, 2, 16))
  assert jsa.na2d(x, x, x, 3, backend="xla").shape == x.shape
  with pytest.raises(ValueError, match="na1d expects query of rank 4"):
    jsa.na1d(x, x, x, 3)


def test_works_under_jit_and_vmap_free_grad_of_model():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((16, 48)) * 0.1, jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 16)), jnp.float32)

  @jax.jit
  def loss(w, x):
    qkv = (x @ w).reshape(2, 6, 6, 3, 2, 8)
    out = jsa.na2d(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], 3, backend="xla")
    return jnp.mean(out ** 2)

  g = jax.grad(loss)(w, x)
  assert g.shape == w.shape and np.all(np.isfinite(np.asarray(g)))


X = jnp.ones((1, 16, 4, 32))


@pytest.mark.parametrize("call, match", [
    (lambda: jsa.attention(X[0], X, X), "query must have rank 4"),
    (lambda: jsa.attention(X, X[..., :3, :], X[..., :3, :]), "multiple of kv_heads"),
    (lambda: jsa.attention(X, X, X[:, :8]), "key and value must have the same shape"),
    (lambda: jsa.attention(X, X[..., :16], X[..., :16]), "same head_dim"),
    (lambda: jsa.attention(X.astype(jnp.int32), X, X), "query dtype must be"),
    (lambda: jsa.attention(X, X.astype(jnp.bfloat16), X.astype(jnp.bfloat16)), "share a dtype"),
    (lambda: jsa.attention(X, X, X, masks.from_array(np.ones((3, 3), bool))), "mask array shape"),
    (lambda: jsa.attention(X, X, X, masks.from_array(np.tile([True, False], (16, 8))),
                           backend="triton", interpret=True), "rows of up to 4 runs"),
    (lambda: jsa.attention(X, X, X, "causal"), "mask must be a jax_sparse_attn.masks.Mask"),
    (lambda: jsa.attention(X, X, X, backend="cuda"), "backend must be one of"),
    (lambda: jsa.attention(X, X, X, segment_ids=jnp.zeros((1, 15), jnp.int32)), "segment_ids must be"),
    (lambda: jsa.attention(X, X, X, block_q=48, backend="xla"), "block_q must be a positive power of two"),
    (lambda: jsa.attention(X, X, X, block_kv=0), "block_kv must be a positive power of two"),
    (lambda: jsa.attention(X, X, X, block_q=64.0), "block_q must be a positive power of two"),
    (lambda: jsa.attention(X, X, X, masks.neighborhood((4, 5), 3)), "neighborhood mask covers 20"),
    (lambda: jsa.na2d(jnp.ones((1, 6, 6, 2, 8)), jnp.ones((1, 6, 6, 2, 8)),
                      jnp.ones((1, 6, 6, 2, 8)), 7), "kernel_size \\* dilation"),
    (lambda: jsa.na2d(jnp.ones((1, 6, 6, 2, 8)), jnp.ones((1, 6, 5, 2, 8)),
                      jnp.ones((1, 6, 5, 2, 8)), 3), "same spatial shape"),
    (lambda: jsa.na2d(jnp.ones((1, 6, 6, 2, 8)), jnp.ones((1, 6, 6, 2, 8)),
                      jnp.ones((1, 6, 6, 2, 8)), 3, q_tile_shape=(3, 1)), "power-of-two product"),
    (lambda: jsa.attention(jnp.ones((1, 4096, 64, 64)), jnp.ones((1, 4096, 64, 64)),
                           jnp.ones((1, 4096, 64, 64)), backend="reference"), "materializes"),
    (lambda: jsa.na_tiling((8, 8), 3).tile(jnp.ones((1, 8, 7, 4))), r"x must be \[batch, 8, 8"),
    (lambda: jsa.na_tiling((8, 8), 3).untile(jnp.ones((1, 60, 4))), r"y must be \[batch, 128 \(num_tokens\)"),
    (lambda: jsa.context_parallel.to_zigzag(np.zeros((1, 16)), 0), "num_shards must be"),
    (lambda: jsa.attention(X, X, X, scale="0.1x"), "scale must be a Python float"),
    (lambda: jsa.attention(X, X, X, scale=float("nan")), "scale must be finite"),
    (lambda: jsa.attention(X, X, X, logits_soft_cap=0.0), "logits_soft_cap must be a positive"),
    (lambda: jsa.attention(X, X, X, logits_soft_cap=jnp.float32(2.0)), "logits_soft_cap must be"),
    (lambda: jsa.na2d(jnp.ones((1, 6, 6, 2, 8)), jnp.ones((1, 6, 6, 2, 8)),
                      jnp.ones((1, 6, 6, 2, 8)), 3, logits_soft_cap=float("inf")),
     "logits_soft_cap must be"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only errors")
@pytest.mark.parametrize("backend, needs", [("triton", "an NVIDIA GPU"),
                                            ("mosaic_gpu", "an NVIDIA Hopper GPU"), ("mosaic", "a TPU")])
def test_kernel_backend_without_its_device(backend, needs):
  """A kernel backend asked for on a machine without its device: a ValueError naming the
  backend and what it needs (not an error from inside Pallas); interpret mode runs."""
  with pytest.raises(ValueError, match=f"backend='{backend}' runs on {needs}.*interpret=True"):
    jsa.attention(X, X, X, masks.causal(), backend=backend)
  with pytest.raises(ValueError, match=f"backend='{backend}' runs on"):
    jsa.na2d(jnp.ones((1, 6, 6, 2, 8)), jnp.ones((1, 6, 6, 2, 8)), jnp.ones((1, 6, 6, 2, 8)), 3,
             backend=backend)
  if backend == "triton":  # (the others' interpret modes: test_mosaic_gpu*, test_tpu_kernels)
    out = jsa.attention(X, X, X, masks.causal(), backend=backend, interpret=True)
    assert out.shape == X.shape


def test_import_is_light():
  """`import jax_sparse_attn` loads no Pallas code, and the kernel packages import the
  backend registry, not `ops` (no import cycle)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys, jax_sparse_attn; "
          "assert not [m for m in sys.modules if 'pallas' in m], 'pallas imported'; "
          "import pallas_kernels.gpu, pallas_kernels.tpu")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
  for path in ("pallas_kernels/gpu/__init__.py", "pallas_kernels/tpu/__init__.py"):
    src = open(os.path.join(root, path)).read()
    assert "jax_sparse_attn.ops" not in src and "jax_sparse_attn.backends" in src


@pytest.mark.parametrize("backend", ["xla", "triton"])
def test_na_tiled_order_skips_permutation(backend):
  rng = np.random.default_rng(4)
  spatial = (9, 13)
  q, k, v = (jnp.asarray(rng.standard_normal((1,) + spatial + (2, 16)), jnp.float32)
             for _ in range(3))
  t = jsa.na_tiling(spatial, (3, 5), dilation=(2, 1), block=16)
  assert t.num_tokens >= 9 * 13 and t.num_tokens % 16 == 0
  kw = dict(interpret=True) if backend == "triton" else {}
  out_t = jsa.na(t.tile(q), t.tile(k), t.tile(v), (3, 5), dilation=(2, 1), tiling=t,
                 backend=backend, **kw)
  want = jsa.na(q, k, v, (3, 5), dilation=(2, 1), backend="reference")
  assert brute_force.rel_err(t.untile(out_t), want) < 1e-4
  with pytest.raises(ValueError, match="differ from the tiling"):
    jsa.na(t.tile(q), t.tile(k), t.tile(v), 3, tiling=t, backend=backend)
  with pytest.raises(ValueError, match="tiling.num_tokens"):
    jsa.na(q.reshape(1, -1, 2, 16), k.reshape(1, -1, 2, 16), v.reshape(1, -1, 2, 16),
           (3, 5), dilation=(2, 1), tiling=t, backend=backend)


def test_function_mask_with_jnp_ops_first_built_under_jit():
  """A `from_function` mask written with jnp (abs, where), whose block map is first built
  while jit traces the call: the host evaluates it eagerly (it used to raise
  TracerArrayConversionError unless an eager call had cached the plan)."""
  mask = masks.from_function(lambda q, kv: (jnp.abs(q - kv) <= 7)
                             & jnp.where(q > 100, kv % 2 == 0, True))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 300, 2, 32), jnp.float32)
  got = jax.jit(lambda x: jsa.attention(x, x, x, mask, backend="xla"))(x)
  want = jsa.attention(x, x, x, mask, backend="reference")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_backward_blocks_of_four_parameters():
  """A registered backend's `backward_blocks` written before its fifth parameter
  (``segments``) existed is called without it; one with five gets it."""
  from jax_sparse_attn import backends, ops
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import make_plan
  mask = masks.neighborhood((16, 16), 5)
  lay = TiledLayout((16, 16), (1, 1), (4, 4))
  plan = make_plan(mask, lay, lay)
  seen = []
  xla = backends.get_backend("xla")
  four = xla._replace(backward_blocks=lambda h, dtype, config, m: seen.append(4))
  five = xla._replace(backward_blocks=lambda h, dtype, config, m, segments: seen.append(segments))
  assert ops._backward_plan(four, mask, plan, 32, jnp.float32, None, segments=True) is None
  assert ops._backward_plan(five, mask, plan, 32, jnp.float32, None, segments=True) is None
  assert seen == [4, True]
