"""`jax_sparse_attn.dot_product_attention` against `jax.nn.dot_product_attention` itself:
outputs, log-sum-exp and gradients on randomized shapes (GQA, T != S without rows that see
nothing, causal, windows, padding lengths, an array mask), on the xla backend and the GPU
and TPU kernels in interpret mode; and every argument it does not take is a ValueError that
names it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_sparse_attn as jsa
from strategies import examples


@st.composite
def problems(draw):
  kv_heads = draw(st.sampled_from([1, 2]))
  t = draw(st.sampled_from([1, 37, 90]))  # few shapes: each is a compile of both functions
  causal = draw(st.booleans())
  window = draw(st.sampled_from([None, 3, (5, 0), (2, 7)]))
  lengths = draw(st.sampled_from([None, "q", "kv", "both"]))
  # Every query row sees a key (jax averages over none where ours gives zeros): with a
  # window S = T (each query sees itself); padded keys only where key 0 is always seen.
  s = t if window is not None else draw(st.sampled_from([1, 37, 90]))
  if causal and s < t:
    s = t
  if window is not None and lengths in ("kv", "both"):
    lengths = "q"
  return dict(batch=2, t=t, s=s, heads=2 * kv_heads, kv_heads=kv_heads, causal=causal,
              window=window, lengths=lengths, seed=draw(st.integers(0, 2 ** 16)))


def _args(p, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(p["seed"]), 4)
  q = jax.random.normal(ks[0], (p["batch"], p["t"], p["heads"], 16), dtype)
  k = jax.random.normal(ks[1], (p["batch"], p["s"], p["kv_heads"], 16), dtype)
  v = jax.random.normal(ks[2], (p["batch"], p["s"], p["kv_heads"], 16), dtype)
  rng = np.random.default_rng(p["seed"])
  kw = dict(is_causal=p["causal"], local_window_size=p["window"])
  if p["lengths"] in ("q", "both"):
    kw["query_seq_lengths"] = jnp.asarray(rng.integers(1, p["t"] + 1, p["batch"]), jnp.int32)
  if p["lengths"] in ("kv", "both"):
    kw["key_value_seq_lengths"] = jnp.asarray(rng.integers(1, p["s"] + 1, p["batch"]),
                                              jnp.int32)
  return (q, k, v), kw


def _check(p, tol=2e-5, dtype=jnp.float32, **ours):
  (q, k, v), kw = _args(p, dtype)
  d_out = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

  def outputs(f):
    def loss(q, k, v):
      out, lse = f(q, k, v, **kw, return_residual=True)
      return jnp.sum(out.astype(jnp.float32) * d_out), (out, lse)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, (out, lse)), grads = step(q, k, v)
    return out, lse, grads

  got_out, got_lse, got_grads = outputs(lambda *a, **k: jsa.dot_product_attention(*a, **k,
                                                                                  **ours))
  want_out, want_lse, want_grads = outputs(jax.nn.dot_product_attention)
  np.testing.assert_allclose(np.asarray(got_out, np.float32), np.asarray(want_out, np.float32),
                             atol=tol, rtol=tol)
  valid = np.ones(want_lse.shape, bool)  # rows past query_seq_lengths: jax's lse is arbitrary
  if "query_seq_lengths" in kw:
    valid &= np.arange(p["t"])[None, :, None] < np.asarray(kw["query_seq_lengths"])[:, None, None]
  np.testing.assert_allclose(np.asarray(got_lse, np.float32)[valid],
                             np.asarray(want_lse, np.float32)[valid], atol=tol * 10, rtol=tol)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol * 10, rtol=tol * 10)


@settings(max_examples=examples(6), deadline=None)
@given(p=problems())
def test_matches_jax_xla(p):
  _check(p, backend="xla")


@pytest.mark.parametrize("backend", ["xla", "triton", "mosaic_gpu", "mosaic"])
def test_matches_jax_kernels(backend):
  """The GPU and TPU kernels in interpret mode (and xla), bf16, against jax's function on
  the same bf16 inputs: causal with padded queries and keys, GQA."""
  p = dict(batch=2, t=200, s=200, heads=4, kv_heads=2, causal=True, window=None,
           lengths="both", seed=3)
  _check(p, tol=2e-2, dtype=jnp.bfloat16, backend=backend, interpret=True)


def test_array_mask_and_rows_that_see_nothing():
  """A [1, 1, T, S] boolean mask is one block-sparse `masks.from_array`; a row that sees
  no key is zeros here (jax's XLA implementation averages every value there)."""
  q = k = v = jax.random.normal(jax.random.PRNGKey(0), (1, 40, 2, 16))
  mask = np.tril(np.ones((40, 40), bool), -1)  # row 0 sees nothing
  got = jsa.dot_product_attention(q, k, v, mask=mask[None, None], backend="xla")
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
  np.testing.assert_allclose(got[:, 1:], want[:, 1:], atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(got[:, 0]) == 0) and np.any(np.asarray(want[:, 0]) != 0)


def test_array_mask_of_one_run_per_row_on_kernels():
  """A boolean mask whose rows are one run each (a band with a prefix) runs on the kernel
  backends as row bounds, against jax's own function."""
  q = k = v = jax.random.normal(jax.random.PRNGKey(1), (1, 70, 2, 16))
  i, j = np.arange(70)[:, None], np.arange(70)[None]
  mask = (j <= np.maximum(i, 9)) & (j >= i - 20)
  assert isinstance(jsa.masks.from_array(mask), jsa.masks.RowBounds)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
  got = jsa.dot_product_attention(q, k, v, mask=mask[None, None], backend="triton",
                                  interpret=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_without_batch_dim():
  """jax's [T, N, H] form (no batch dim): the same outputs, log-sum-exp and gradients."""
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (30, 2, 16)) for i in range(3))
  kw = dict(is_causal=True, local_window_size=(4, 0), return_residual=True)
  got = jsa.dot_product_attention(q, k, v, backend="xla", **kw)
  want = jax.nn.dot_product_attention(q, k, v, **kw)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
  grads = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, **kw)[0])),
                                     argnums=(0, 1, 2)))(q, k, v)
  ours = lambda *a, **k: jsa.dot_product_attention(*a, backend="xla", **k)
  for g, w in zip(grads(ours), grads(jax.nn.dot_product_attention)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_bad_arguments_name_the_rule():
  x = jnp.zeros((1, 8, 2, 16))
  cases = [
      (dict(bias=jnp.zeros((1, 2, 8, 8))), "bias is not supported"),
      (dict(implementation="cudnn"), "implementation must be None or 'xla'"),
      (dict(local_window_size=(3,)), "local_window_size must be an int or a"),
      (dict(local_window_size=-1), "local_window_size must be non-negative"),
      (dict(is_causal=1), "is_causal must be a bool"),
      (dict(mask=np.ones((2, 1, 8, 8), bool)), "one \\[T, S\\] pattern"),
      (dict(mask=np.ones((8, 8), np.int32)), "mask must be boolean"),
      (dict(mask=np.ones((8, 3), bool)), "mask must broadcast to"),
      (dict(query_seq_lengths=jnp.ones((2,), jnp.int32)), "query_seq_lengths must be"),
      (dict(key_value_seq_lengths=jnp.ones((1,), jnp.float32)), "key_value_seq_lengths must"),
      (dict(query_seq_lengths=jnp.ones((1,), jnp.int32),
            segment_ids=jnp.zeros((1, 8), jnp.int32)), "segment_ids cannot be combined"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      jsa.dot_product_attention(x, x, x, **kw)
  with pytest.raises(ValueError, match="all be \\[batch, seq, heads, head_dim\\] or all"):
    jsa.dot_product_attention(x, x[0], x)
  with pytest.raises(ValueError, match="mask must be a concrete boolean array"):
    jax.jit(lambda m: jsa.dot_product_attention(x, x, x, mask=m))(jnp.ones((8, 8), bool))
