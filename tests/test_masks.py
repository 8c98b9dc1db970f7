"""Mask semantics against the float64/loop brute force, and argument validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import brute_force
from strategies import gna_problems
import jax_sparse_attn as jsa
from jax_sparse_attn import masks


def _dense(mask, n_q, n_kv):
  return np.asarray(mask(np.arange(n_q)[:, None], np.arange(n_kv)[None, :]))


@given(gna_problems())
def test_neighborhood_matches_brute_force(problem):
  mask = masks.neighborhood(*problem)
  n = mask.num_tokens
  np.testing.assert_array_equal(_dense(mask, n, n), brute_force.gna_mask(*problem))


@given(gna_problems())
def test_noncausal_neighborhood_sees_exactly_prod_kernel(problem):
  spatial, kernel, stride, dilation, _ = problem
  mask = masks.neighborhood(spatial, kernel, stride, dilation, False)
  dense = _dense(mask, mask.num_tokens, mask.num_tokens)
  assert np.all(dense.sum(1) == np.prod(kernel))


def test_classic_na_window_is_clamped_not_truncated():
  # 1-D, L=10, k=5: query 0 sees keys 0..4, query 9 sees 5..9, query 4 sees 2..6.
  d = _dense(masks.neighborhood((10,), 5), 10, 10)
  assert np.flatnonzero(d[0]).tolist() == [0, 1, 2, 3, 4]
  assert np.flatnonzero(d[9]).tolist() == [5, 6, 7, 8, 9]
  assert np.flatnonzero(d[4]).tolist() == [2, 3, 4, 5, 6]


def test_causal_stride1_neighborhood_is_sliding_window():
  a = _dense(masks.neighborhood((50,), 8, is_causal=True), 50, 50)
  b = _dense(masks.sliding_window(7), 50, 50)
  np.testing.assert_array_equal(a, b)


def test_stride_equal_kernel_is_blocked_attention():
  a = _dense(masks.neighborhood((24,), 6, stride=6), 24, 24)
  b = _dense(masks.block_local(6), 24, 24)
  np.testing.assert_array_equal(a, b)


def test_1d_masks_against_formulas():
  q, kv = np.arange(40)[:, None], np.arange(40)[None, :]
  np.testing.assert_array_equal(_dense(masks.causal(), 40, 40), kv <= q)
  np.testing.assert_array_equal(_dense(masks.causal(offset=3), 40, 40), kv <= q + 3)
  np.testing.assert_array_equal(_dense(masks.sliding_window(5, 2), 40, 40),
                                (kv >= q - 5) & (kv <= q + 2))
  np.testing.assert_array_equal(_dense(masks.block_local(8, 2), 40, 40),
                                (kv >= (q // 8) * 8 - 2) & (kv < (q // 8 + 1) * 8 + 2))
  np.testing.assert_array_equal(_dense(masks.full(), 40, 40), np.ones((40, 40), bool))
  np.testing.assert_array_equal(_dense(masks.sink(3), 40, 40), np.broadcast_to(kv < 3, (40, 40)))


def test_combinators():
  c, w = masks.causal(), masks.sliding_window(3, 3)
  f = masks.from_function(lambda q, k: (q - k) % 5 == 0)
  arr = np.random.default_rng(0).random((40, 40)) < 0.3
  a = masks.from_array(arr)
  q, kv = np.arange(40)[:, None], np.arange(40)[None, :]
  assert (c & w).is_interval and not (c | w).is_interval and not (c & f).is_interval
  np.testing.assert_array_equal(_dense(c & w, 40, 40), (kv <= q) & (kv >= q - 3))
  np.testing.assert_array_equal(_dense(c | w, 40, 40), (kv <= q) | (abs(kv - q) <= 3))
  np.testing.assert_array_equal(_dense(c & f, 40, 40), (kv <= q) & ((q - kv) % 5 == 0))
  np.testing.assert_array_equal(_dense(a | c, 40, 40), arr | (kv <= q))


def test_from_array_rows_of_one_run():
  """An array whose rows are one run of keys each (or none) becomes row bounds (an interval
  mask, equal and hashed by value) that evaluate to the array exactly, on the host and in
  jnp; inside `|` (or beside a mask function) row bounds are evaluated elementwise, which
  only `xla` can take, except unions of interval terms, which every kernel backend tests as
  intervals per term."""
  from backend_cases import one_run_rows
  from jax_sparse_attn.backends import has_array_mask
  for sq, skv in ((1, 1), (37, 90), (90, 37), (128, 128)):
    arr = one_run_rows(sq, skv)
    arr[0] = False
    m = masks.from_array(arr)
    assert isinstance(m, masks.RowBounds) and m.is_interval and m.shape == (sq, skv)
    q, kv = np.arange(sq)[:, None], np.arange(skv)[None, :]
    np.testing.assert_array_equal(m(q, kv), arr)
    np.testing.assert_array_equal(np.asarray(m(jnp.asarray(q), jnp.asarray(kv))), arr)
    assert m == masks.from_array(arr.copy()) and hash(m) == hash(masks.from_array(arr.copy()))
    if arr.any():  # another array: another mask
      other = arr.copy()
      other[np.argmax(arr.any(1))] = False
      assert masks.from_array(other) != m
  rows = masks.from_array(np.tril(np.ones((8, 8), bool)))
  assert not has_array_mask(rows) and not has_array_mask(rows & masks.sliding_window(3))
  assert has_array_mask(rows | masks.sink(1), routed=True)  # with block_selection
  assert not has_array_mask(rows | masks.sink(1))  # every kernel backend, sharded too
  f = masks.from_function(lambda q, k: q >= k)
  assert has_array_mask(rows & f) and not has_array_mask(f)


def test_from_array_rows_of_several_runs():
  """Rows of up to 4 runs: the union of one row-bounds mask per run (each row's r-th run in
  term r), equal to the array; every kernel backend takes it; 5 runs: the
  array."""
  from jax_sparse_attn.backends import has_array_mask
  rng = np.random.default_rng(3)
  for sq, skv, runs in ((40, 70, 2), (33, 90, 4), (8, 8, 1)):
    arr = np.zeros((sq, skv), bool)
    for q in range(sq):
      cuts = np.sort(rng.choice(skv + 1, 2 * rng.integers(0, runs + 1), replace=False))
      for a, b in cuts.reshape(-1, 2):
        arr[q, a:b] = True
    m = masks.from_array(arr)
    most = max(len(np.flatnonzero(np.diff(row.astype(int), prepend=0) == 1)) for row in arr)
    assert isinstance(m, masks.Or if most > 1 else masks.RowBounds), (type(m), most)
    np.testing.assert_array_equal(m(np.arange(sq)[:, None], np.arange(skv)[None]), arr)
    terms = masks.interval_terms(m)
    assert terms is not None and all(isinstance(t, masks.RowBounds) for t in terms)
    assert not has_array_mask(m)
    assert has_array_mask(m, routed=True) == (len(terms) > 1)
  five = np.tile([True, False], (3, 5))
  assert isinstance(masks.from_array(five), masks.FromArray)
  assert has_array_mask(masks.from_array(five))
  assert has_array_mask(masks.from_array(five), routed=True)
  (lo0, hi0), (lo1, hi1) = masks.run_bounds(np.array([[0, 1, 1, 0, 1], [0, 0, 1, 0, 0],
                                                      [0, 0, 0, 0, 0]], bool), 4)
  assert lo0.tolist() == [1, 2, 1] and hi0.tolist() == [2, 2, 0]
  assert lo1.tolist() == [4, 1, 1] and hi1.tolist() == [4, 0, 0]
  m = masks.from_row_bounds(np.array([0, 5, 3]), np.array([2, 4, 99]), 10)
  np.testing.assert_array_equal(m(np.arange(3)[:, None], np.arange(10)[None]),
                                [[k <= 2 for k in range(10)], [False] * 10,
                                 [k >= 3 for k in range(10)]])


@pytest.mark.parametrize("call, match", [
    (lambda: masks.from_row_bounds(np.zeros(3), np.zeros(3, int), 4), "integer arrays"),
    (lambda: masks.from_row_bounds(np.zeros(3, int), np.zeros(2, int), 4), "one length"),
    (lambda: masks.from_row_bounds(np.zeros(3, int), np.zeros(3, int), 0), "seq_kv"),
])
def test_row_bounds_rejects(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_traced_arrays_are_named():
  """An array mask built inside jit (a traced value) is a ValueError naming the argument."""
  with pytest.raises(ValueError, match="from_array's array must be a concrete host array"):
    jax.jit(lambda a: jnp.sum(masks.from_array(a).array))(np.ones((4, 4), bool))
  with pytest.raises(ValueError, match="row bounds lo must be a concrete host array"):
    jax.jit(lambda lo: masks.from_row_bounds(lo, np.zeros(4, int), 4).lo)(np.zeros(4, int))


def test_from_function_results():
  """fn's result must be booleans (an int mask would otherwise read as nonzero = attend);
  one that depends on one index, or a constant, broadcasts to every pair (host and jnp)."""
  with pytest.raises(ValueError, match="fn must return booleans"):
    _dense(masks.from_function(lambda q, k: q - k), 8, 8)
  q = jnp.zeros((1, 16, 1, 8))
  with pytest.raises(ValueError, match="fn must return booleans"):
    jsa.attention(q, q, q, masks.from_function(lambda q, k: (q - k) % 2), backend="xla")
  kv = np.arange(8)[None, :]
  np.testing.assert_array_equal(_dense(masks.from_function(lambda q, k: k < 3), 8, 8),
                                np.broadcast_to(kv < 3, (8, 8)))
  np.testing.assert_array_equal(_dense(masks.from_function(lambda q, k: True), 8, 8),
                                np.ones((8, 8), bool))
  jq, jk = jnp.arange(4)[:, None], jnp.arange(4)[None, :]
  assert masks.from_function(lambda q, k: True)(jq, jk).shape == (4, 4)
  # A one-index mask through an op, forward and gradients, against the float64 brute force.
  rng = np.random.default_rng(0)
  q, k, v, d_out = (rng.standard_normal((1, 40, 2, 8)).astype(np.float32) for _ in range(4))
  dense = np.broadcast_to(np.arange(40)[None, :] < 21, (40, 40))
  fn = lambda *x: jsa.attention(*x, masks.from_function(lambda q, k: k < 21), backend="xla")
  out, vjp = jax.vjp(fn, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  assert brute_force.rel_err(out, brute_force.attention(q, k, v, dense, 8 ** -0.5)[0]) < 1e-5
  want = brute_force.attention_grads(q, k, v, dense, 8 ** -0.5, d_out)
  for got, ref in zip(vjp(jnp.asarray(d_out)), want, strict=True):
    assert brute_force.rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("call, match", [
    (lambda: masks.neighborhood((10,), 11), "kernel_size \\* dilation"),
    (lambda: masks.neighborhood((10,), 5, dilation=3), "kernel_size \\* dilation"),
    (lambda: masks.neighborhood((10,), 3, stride=4), "stride must not exceed kernel_size"),
    (lambda: masks.neighborhood((10, 10), (3, 3, 3)), "kernel_size must have 2 entries"),
    (lambda: masks.neighborhood((10,), 0), "kernel_size must be positive"),
    (lambda: masks.neighborhood((10,), 3, is_causal=1), "is_causal must be a bool"),
    (lambda: masks.neighborhood((10,), 2.5), "kernel_size must be an int"),
    (lambda: masks.sliding_window(-1), "left must be a non-negative int"),
    (lambda: masks.block_local(0), "block_size must be positive"),
    (lambda: masks.from_function(3), "fn must be callable"),
    (lambda: masks.from_array(np.zeros((3, 3))), "2-D boolean array"),
    (lambda: masks.causal() & 3, "other must be a jax_sparse_attn.masks.Mask"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


_ATOMS = st.sampled_from([
    masks.full(), masks.causal(), masks.causal(offset=3), masks.causal(offset=-4),
    masks.sliding_window(5), masks.sliding_window(3, 6), masks.block_local(8, 2),
    masks.sink(3), masks.neighborhood(40, 7), masks.neighborhood(40, 9, stride=3)])
_COMPOSED = st.recursive(
    _ATOMS, lambda inner: st.tuples(inner, inner, st.booleans()).map(
        lambda t: (t[0] & t[1]) if t[2] else (t[0] | t[1])), max_leaves=5)


@given(mask=_COMPOSED, n_q=st.integers(1, 40), n_kv=st.integers(1, 40),
       pad=st.integers(0, 9))
def test_union_intervals_equal_the_mask(mask, n_q, n_kv, pad):
  """`interval_terms` / `union_intervals` (the Hopper kernels' test of unions: an OR over
  terms of the AND over each term's merged dims) equal the mask on every pair, padded
  positions (past n_q / n_kv) seeing nothing; more than `MAX_TERMS` terms: no union form."""
  terms = masks.interval_terms(mask)
  if terms is None:
    return
  assert 1 <= len(terms) <= masks.MAX_TERMS
  q = np.arange(n_q + pad)
  kv = np.arange(n_kv + pad)
  lo, hi, c = masks.union_intervals(terms, np.minimum(q, n_q - 1), np.minimum(kv, n_kv - 1),
                                    q < n_q, kv < n_kv)
  assert lo.shape[0] % len(terms) == 0 and lo.shape == (lo.shape[0], len(q))
  per = lo.shape[0] // len(terms)
  got = np.zeros((len(q), len(kv)), bool)
  for t in range(len(terms)):
    term = np.ones_like(got)
    for d in range(t * per, (t + 1) * per):
      term &= (lo[d][:, None] <= c[d][None]) & (c[d][None] <= hi[d][:, None])
    got |= term
  want = np.zeros_like(got)
  want[:n_q, :n_kv] = _dense(mask, n_q, n_kv)
  np.testing.assert_array_equal(got, want)


def test_interval_terms_forms():
  """The LM mask is two one-dim terms; a mask function has no union form; a product of
  unions past `MAX_TERMS` terms has none either."""
  lm = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
  terms = masks.interval_terms(lm)
  assert len(terms) == 2
  lo, _, _ = masks.union_intervals(terms, np.arange(10), np.arange(10), np.ones(10, bool),
                                   np.ones(10, bool))
  assert lo.shape == (2, 10)  # causal & window merged into one dim per term
  assert masks.interval_terms(lm | masks.from_function(lambda q, k: q == k)) is None
  two = masks.sink(1) | masks.causal()
  assert masks.interval_terms(two & two) is not None
  assert masks.interval_terms(two & two & two) is None
