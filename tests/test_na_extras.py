"""Neighborhoods with padding masks, segment ids and extra tokens, and packed grids of
different sizes, on every backend (Pallas kernels in interpret mode) vs the float64 brute
force: forward, lse and gradients."""
import math

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

KW = {
    "reference": {},
    "xla": {},
    "triton": dict(interpret=True, block_q=16, block_kv=16),
    "mosaic": dict(interpret=True),
}
TOL = backend_cases.TOL


def _flat(x, n):
  return np.asarray(x, np.float64).reshape(x.shape[0], n, *x.shape[-2:])


def _kv_valid(rng, mode, batch, spatial):
  """Padding masks: random keys, a whole region (covers whole windows), or every key of the
  first batch row (every query of it sees nothing)."""
  if mode == "none":
    return None
  if mode == "random":
    return rng.random((batch,) + spatial) < 0.6
  valid = np.ones((batch,) + spatial, bool)
  if mode == "region":
    valid[(slice(None),) + tuple(slice(0, max(1, s // 2 + 1)) for s in spatial)] = False
  else:
    valid[0] = False
  return valid


@st.composite
def masked_na_problems(draw):
  p = draw(backend_cases.na_problems())
  valid = draw(st.sampled_from(["none", "random", "region", "all_first"]))
  segments = draw(st.booleans()) if valid != "none" else True
  return dict(p, batch=2, valid=valid, segments=segments)


def _check(run, args, want, want_lse, want_grads, tol, n, q_shape):
  """Forward (zeros and lse -inf where a row sees nothing) and gradients."""
  d_out = np.random.default_rng(1).standard_normal(q_shape).astype(np.float32)
  (out, lse), grads = backend_cases.outputs_and_grads(run, d_out, *args)
  assert out.shape == q_shape and out.dtype == args[0].dtype
  assert brute_force.rel_err(_flat(out, n), want) < tol
  lse = np.asarray(lse).reshape(want_lse.shape)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=tol * 10, rtol=tol)
  assert np.all(_flat(out, n)[~finite] == 0)
  for i, (got, ref) in enumerate(zip(grads, want_grads)):
    assert not np.any(np.isnan(np.asarray(got, np.float32))), i
    got = np.asarray(got, np.float64).reshape(ref.shape)
    err = brute_force.rel_err(got, ref)
    assert err < tol * 2 or backend_cases._small(got, ref, tol), (i, err)
  return d_out


def check_masked_na(p, backend, extra: int = 0, **kwargs):
  """`na` with kv_valid / segment ids (and `extra` additional tokens) vs the brute force."""
  spatial, kernel, stride, dilation, causal = p["problem"]
  q, k, v, _, rng = backend_cases.make_inputs(p, spatial)
  b, n = p["batch"], math.prod(spatial)
  valid = _kv_valid(rng, p["valid"], b, spatial)
  seg = rng.integers(0, 2, (b,) + spatial).astype(np.int32) if p["segments"] else None
  m = np.broadcast_to(brute_force.gna_mask(*p["problem"])[None], (b, n, n)).copy()
  if valid is not None:
    m &= valid.reshape(b, 1, n)
  if seg is not None:
    m &= seg.reshape(b, n, 1) == seg.reshape(b, 1, n)
  kk, vv = _flat(k, n), _flat(v, n)
  args = [q, k, v]
  extra_kw = {}
  if extra:
    ak = jnp.asarray(rng.standard_normal((b, extra, p["kv_heads"], p["head_dim"])), q.dtype)
    av = jnp.asarray(rng.standard_normal((b, extra, p["kv_heads"], p["head_dim"])), q.dtype)
    extra_valid = rng.random((b, extra)) < 0.7
    extra_valid[0] = False  # the first row: only the neighborhood (maybe nothing at all)
    m = np.concatenate([m, np.broadcast_to(extra_valid[:, None], (b, n, extra))], axis=2)
    kk = np.concatenate([kk, np.asarray(ak, np.float64)], 1)
    vv = np.concatenate([vv, np.asarray(av, np.float64)], 1)
    args += [ak, av]
    extra_kw = dict(additional_valid=jnp.asarray(extra_valid))
  if backend not in ("reference", "mosaic"):  # TPU tiles hold 128 tokens: its own choice
    kwargs = dict(q_tile_shape=p["tile_q"], kv_tile_shape=p["tile_kv"], **kwargs)
  scale = 1.0 / math.sqrt(p["head_dim"])
  want, want_lse = brute_force.attention(_flat(q, n), kk, vv, m, scale)

  def run(q, k, v, *extra_kv):
    more = dict(additional_keys=extra_kv[0], additional_values=extra_kv[1]) if extra_kv else {}
    return jsa.na(q, k, v, kernel, stride, dilation, causal, backend=backend, return_lse=True,
                  kv_valid=None if valid is None else jnp.asarray(valid),
                  segment_ids=None if seg is None else jnp.asarray(seg), **more, **extra_kw,
                  **kwargs)

  out = jax.jit(run)(*args)[0]
  d_out = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
  dq, dk, dv = brute_force.attention_grads(_flat(q, n), kk, vv, m, scale, _flat(d_out, n))
  want_grads = [dq, dk[:, :n], dv[:, :n]] + ([dk[:, n:], dv[:, n:]] if extra else [])
  _check(run, args, want, want_lse, want_grads, TOL[p["dtype"]], n, q.shape)


@pytest.mark.parametrize("backend", sorted(KW))
@settings(max_examples=examples(2))
@given(p=masked_na_problems())
def test_masked_na(backend, p):
  check_masked_na(p, backend, **KW[backend])


@pytest.mark.parametrize("backend", ["xla", "triton"])
@settings(max_examples=examples(2))
@given(p=masked_na_problems(), extra=st.integers(1, 20))
def test_extra_tokens(backend, p, extra):
  check_masked_na(p, backend, extra=extra, **KW[backend])


@settings(max_examples=examples(2))
@given(p=masked_na_problems(), extra=st.integers(1, 20))
def test_extra_tokens_mosaic(p, extra):
  # The TPU kernels in interpret mode take ~40 s an example on CI's 2 cores: fewer examples.
  check_masked_na(p, "mosaic", extra=extra, **KW["mosaic"])


def test_extra_tokens_only_and_tiled_order():
  # No padding mask; the tiled-order entry point (tiling=) with kv_valid and extra tokens.
  rng = np.random.default_rng(4)
  spatial, b, h, d = (6, 10), 2, 4, 16
  t = jsa.na_tiling(spatial, (3, 5), block=16)
  x = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, k, v = x(b, *spatial, h, d), x(b, *spatial, 2, d), x(b, *spatial, 2, d)
  ak, av = x(b, 7, 2, d), x(b, 7, 2, d)
  valid = jnp.asarray(rng.random((b,) + spatial) < 0.5)
  want = compiled.run(lambda q, k, v, valid, ak, av: jsa.na2d(
      q, k, v, (3, 5), kv_valid=valid, additional_keys=ak, additional_values=av,
      backend="reference"), q, k, v, valid, ak, av)
  got = compiled.run(lambda q, k, v, valid, ak, av: t.untile(jsa.na(
      t.tile(q), t.tile(k), t.tile(v), (3, 5), tiling=t, kv_valid=t.tile(valid),
      additional_keys=ak, additional_values=av, backend="triton", interpret=True)),
      q, k, v, valid, ak, av)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@st.composite
def packed_problems(draw):
  ndim = draw(st.integers(1, 2))
  kernel, stride, dilation, causal = [], [], [], []
  for _ in range(ndim):
    dl = draw(st.integers(1, 2))
    kk = draw(st.integers(1, 4))
    kernel.append(kk)
    dilation.append(dl)
    stride.append(draw(st.integers(1, kk)))
    causal.append(draw(st.booleans()))
  shapes = [tuple(draw(st.integers(kk * dl, kk * dl + 5)) for kk, dl in zip(kernel, dilation))
            for _ in range(draw(st.integers(1, 3)))]
  kv_heads = draw(st.sampled_from([1, 2]))
  return dict(shapes=shapes, problem=(tuple(kernel), tuple(stride), tuple(dilation),
                                      tuple(causal)),
              batch=draw(st.integers(1, 2)), heads=kv_heads * draw(st.sampled_from([1, 2])),
              kv_heads=kv_heads, head_dim=16, dtype=jnp.float32,
              seed=draw(st.integers(0, 2**16)))


def packed_mask(shapes, kernel, stride, dilation, causal):
  """The brute force: a block-diagonal of per-grid neighborhoods."""
  sizes = [math.prod(s) for s in shapes]
  out = np.zeros((sum(sizes), sum(sizes)), bool)
  start = 0
  for shape, size in zip(shapes, sizes):
    out[start:start + size, start:start + size] = brute_force.gna_mask(
        shape, kernel, stride, dilation, causal)
    start += size
  return out


def check_packed(p, backend, **kwargs):
  n = sum(math.prod(s) for s in p["shapes"])
  q, k, v, d_out, _ = backend_cases.make_inputs(dict(p, sq=n, skv=n))
  m = packed_mask(p["shapes"], *p["problem"])
  scale = 1.0 / math.sqrt(p["head_dim"])
  want, want_lse = brute_force.attention(q, k, v, m, scale)
  run = lambda q, k, v: jsa.na_packed(q, k, v, p["shapes"], *p["problem"], backend=backend,
                                      return_lse=True, **kwargs)
  out = jax.jit(run)(q, k, v)[0]
  d_out = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
  want_grads = brute_force.attention_grads(q, k, v, m, scale, d_out)
  _check(run, [q, k, v], want, want_lse, want_grads, TOL[p["dtype"]], n, q.shape)


@pytest.mark.parametrize("backend", sorted(set(KW) - {"mosaic"}))
@settings(max_examples=examples(3))
@given(p=packed_problems())
def test_packed(backend, p):
  # One kernel, each grid in its own tiles (PackedLayout); reference: the raster order.
  check_packed(p, backend, method="raster" if backend == "reference" else "tiled",
               **KW[backend])


@settings(max_examples=examples(2))
@given(p=packed_problems())
def test_packed_mosaic(p):
  # The TPU kernels in interpret mode (slow on CI's 2 cores): fewer examples.
  check_packed(p, "mosaic", method="tiled", **KW["mosaic"])


@pytest.mark.parametrize("backend, method", [("xla", "raster"), ("triton", "raster"),
                                             ("xla", "per_grid"), ("triton", "per_grid")])
@settings(max_examples=examples(2))
@given(p=packed_problems())
def test_packed_methods(backend, method, p):
  check_packed(p, backend, method=method, **KW[backend])


def test_packed_layout_round_trip():
  from jax_sparse_attn.layout import PackedLayout, TiledLayout
  layout = PackedLayout((TiledLayout((5, 6), (1, 2), (2, 4)), TiledLayout((3, 7), (1, 1), (4, 2))))
  x = jnp.arange(2 * 51 * 3).reshape(2, 51, 3)
  y = layout.to_kernel(x)
  assert y.shape == (2, layout.padded_len, 3) and layout.padded_len % layout.block == 0
  np.testing.assert_array_equal(np.asarray(layout.from_kernel(y)), np.asarray(x))
  rows = layout.rows()
  np.testing.assert_array_equal(np.asarray(y[0, rows >= 0, 0]), np.asarray(x[0, rows[rows >= 0], 0]))
  with pytest.raises(ValueError, match="tiles of one size"):
    PackedLayout((TiledLayout((5, 6), (1, 1), (2, 4)), TiledLayout((3, 7), (1, 1), (4, 4))))


def test_packed_mask_is_the_block_diagonal():
  shapes = [(5, 4), (3, 7), (4, 4)]
  mask = masks.packed_neighborhood(shapes, (3, 2), (2, 1), (1, 2), (False, True))
  n = mask.num_tokens
  got = mask(np.arange(n)[:, None], np.arange(n)[None, :])
  np.testing.assert_array_equal(got, packed_mask(shapes, (3, 2), (2, 1), (1, 2),
                                                 (False, True)))
  # jnp evaluation (the XLA backend's element test) agrees.
  np.testing.assert_array_equal(
      np.asarray(mask(jnp.arange(n)[:, None], jnp.arange(n)[None, :])), got)


def test_all_masked_gives_zeros_and_finite_grads():
  q = jnp.ones((1, 4, 4, 2, 16))
  valid = jnp.zeros((1, 4, 4), bool)
  for backend, kw in KW.items():
    out, (g,) = backend_cases.outputs_and_grads(
        lambda q: jsa.na2d(q, q, q, 3, kv_valid=valid, backend=backend, **kw), jnp.ones_like(q), q)
    assert np.all(np.asarray(out) == 0)
    assert np.all(np.asarray(g) == 0), backend


X = jnp.ones((1, 6, 6, 2, 16))


@pytest.mark.parametrize("call, match", [
    (lambda: jsa.na2d(X, X, X, 3, kv_valid=jnp.ones((1, 6, 5), bool)), "kv_valid must have shape"),
    (lambda: jsa.na2d(X, X, X, 3, kv_valid=jnp.ones((1, 6, 6))), "kv_valid must be a boolean"),
    (lambda: jsa.na2d(X, X, X, 3, segment_ids=jnp.ones((1, 6, 6))), "segment_ids must be an int"),
    (lambda: jsa.na2d(X, X, X, 3, segment_ids=-jnp.ones((1, 6, 6), jnp.int32),
                      kv_valid=jnp.ones((1, 6, 6), bool)), "segment_ids must be >= 0"),
    (lambda: jsa.na2d(X, X, X, 3, additional_keys=jnp.ones((1, 3, 2, 16))),
     "additional_keys and additional_values must be given together"),
    (lambda: jsa.na2d(X, X, X, 3, additional_keys=jnp.ones((1, 3, 2, 8)),
                      additional_values=jnp.ones((1, 3, 2, 8))), "additional_keys must be"),
    (lambda: jsa.na2d(X, X, X, 3, additional_keys=jnp.ones((1, 3, 2, 16), jnp.bfloat16),
                      additional_values=jnp.ones((1, 3, 2, 16), jnp.bfloat16)), "dtype"),
    (lambda: jsa.na2d(X, X, X, 3, additional_keys=jnp.ones((1, 3, 2, 16)),
                      additional_values=jnp.ones((1, 3, 2, 16)),
                      additional_valid=jnp.ones((1, 4), bool)), "additional_valid must be"),
    (lambda: jsa.na_packed(jnp.ones((1, 30, 2, 16)), jnp.ones((1, 30, 2, 16)),
                           jnp.ones((1, 30, 2, 16)), [(4, 4), (3, 5)], 3),
     "packed neighborhood mask covers 31 tokens"),
    (lambda: jsa.na_packed(X[:, 0], X[:, 0], X[:, 0], [(2, 3)], 1, method="tiles"),
     "method must be one of"),
    (lambda: jsa.na_packed(X[:, 0], X[:, 0], X[:, 0], [(2, 3)], 1, method="tiled",
                           segment_ids=jnp.zeros((1, 6), jnp.int32)), "need method='raster'"),
    (lambda: masks.packed_neighborhood([(4, 4), (2, 5)], 3), r"spatial_shapes\[1\]"),
    (lambda: masks.packed_neighborhood([(4, 4), (5,)], 3), "same rank"),
    (lambda: masks.packed_neighborhood((4, 4), 3), "sequence of shapes"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# The Hopper kernels in GPU interpret mode (bf16; their blocks are 128 tokens).
def test_masked_na_mosaic_gpu():
  """The Hopper forward and backward (the Triton backward after the Hopper forward, the
  default here, is `test_mosaic_gpu.test_na`'s path; masked NA on Triton: `test_masked_na`)."""
  from pallas_kernels.gpu import MosaicGPUConfig
  p = dict(problem=((12, 16), (5, 7), (2, 1), (1, 2), (False, True)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=3, tile_q=(8, 16),
           tile_kv=(8, 16), valid="region", segments=True)
  check_masked_na(p, "mosaic_gpu", extra=5, interpret=True,
                  config=MosaicGPUConfig(backward="mosaic_gpu"))


def test_masked_na_mosaic_gpu_boxes(monkeypatch):
  """Padding masks and segment ids on the Hopper forward's box path: Q/K/V read as boxes of
  the caller's layout (no permutation into kernel order), the segment vectors per kernel
  position; GQA, a causal dim, random padding, the Hopper backward."""
  from pallas_kernels.gpu import MosaicGPUConfig
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd

  def permuted(*args):
    raise AssertionError("the forward permuted into kernel order")

  monkeypatch.setattr(attention_fwd, "kernel_order", permuted)
  p = dict(problem=((16, 16), (5, 7), (1, 1), (1, 1), (False, True)), batch=2, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=4, tile_q=(8, 16),
           tile_kv=(8, 16), valid="random", segments=True)
  check_masked_na(p, "mosaic_gpu", interpret=True,
                  config=MosaicGPUConfig(backward="mosaic_gpu"))


def test_masked_na_mosaic_gpu_segment_tiles(monkeypatch):
  """With a padding mask `na`'s default tiles on the Hopper forward are chosen for the
  element test it runs then (`cost.auto_tiles(..., segments=True)`: here (16, 8) KV tiles
  where window boxes would take (8, 16)); gradients against the brute force."""
  from pallas_kernels.gpu import MosaicGPUConfig
  from pallas_kernels.gpu.mosaic_gpu import cost
  mask = masks.neighborhood((16, 24), (7, 9))
  pick = cost.auto_tiles(mask, 128, 128, True)
  assert pick != cost.auto_tiles(mask, 128, 128)
  plans = backend_cases.spy_run_plans(monkeypatch)
  p = dict(problem=((16, 24), (7, 9), (1, 1), (1, 1), (False, False)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=6, tile_q=None, tile_kv=None,
           valid="random", segments=False)
  check_masked_na(p, "mosaic_gpu", interpret=True,
                  config=MosaicGPUConfig(backward="mosaic_gpu"))
  assert plans and all((f.q_layout.tile_shape, f.kv_layout.tile_shape) == pick
                       for f, _ in plans)


def test_masked_na_mosaic_gpu_wide(monkeypatch):
  """A padding mask at head_dim 160 (160 columns, 64-key blocks) on the Hopper forward and the
  role-split Hopper backward, which `auto`'s rule keeps for padded neighborhoods above 128
  columns (`config.hopper_backward_neighborhood`); GQA, a causal dim, random padding."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  calls = backend_cases.spy(monkeypatch, attention_bwd.bwd_wide, "backward",
                            lambda a, kw, result: True)
  p = dict(problem=((12, 16), (5, 7), (1, 1), (1, 1), (False, True)), batch=1, heads=2,
           kv_heads=1, head_dim=160, dtype=jnp.bfloat16, seed=4, tile_q=None, tile_kv=None,
           valid="random", segments=False)
  check_masked_na(p, "mosaic_gpu", interpret=True)
  assert calls


def test_packed_mosaic_gpu():
  p = dict(shapes=[(7, 12), (6, 7), (9, 6)], problem=((3, 5), (1, 2), (2, 1), (True, False)),
           batch=1, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=5)
  check_packed(p, "mosaic_gpu", method="tiled", interpret=True)
