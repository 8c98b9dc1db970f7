"""Shared randomized checks of a backend against the float64 brute force (used by every
backend's test file)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import brute_force
from strategies import gna_problems
import jax_sparse_attn as jsa
from jax_sparse_attn import masks

TOL = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}

SEQ_MASKS = {
    "full": lambda sq, skv: masks.full(),
    "causal": lambda sq, skv: masks.causal(),
    "causal_bottom_right": lambda sq, skv: masks.causal(offset=skv - sq),
    "window": lambda sq, skv: masks.sliding_window(7, 2),
    "causal_window": lambda sq, skv: masks.causal() & masks.sliding_window(11),
    "block_local": lambda sq, skv: masks.block_local(8, 3),
    "function": lambda sq, skv: masks.from_function(lambda q, k: (q + 2 * k) % 3 != 0),
    "or": lambda sq, skv: masks.causal() | masks.sliding_window(0, 4),
    "masked_rows": lambda sq, skv: masks.causal(offset=-5),  # first rows see nothing
    "window_sink": lambda sq, skv: masks.causal() & (masks.sliding_window(5) | masks.sink(2)),
    "union3": lambda sq, skv: ((masks.sliding_window(6) | masks.sink(2) | masks.block_local(16))
                               & masks.causal(offset=1)),
    # An explicit array whose rows are one run each (some empty): `masks.RowBounds`.
    "array_rows": lambda sq, skv: masks.from_array(one_run_rows(sq, skv)),
    # Rows of 1-3 runs: a union of row bounds, tested as intervals per term by every kernel.
    "array_runs": lambda sq, skv: masks.from_array(several_run_rows(sq, skv)),
}


def several_run_rows(sq, skv, seed=0):
  """A boolean [sq, skv] array of a causal window of 24 keys, the first 3 keys (sinks) and a
  random run of 10 keys per row below the diagonal, so rows of 1-3 runs (the first rows see
  at least one key)."""
  rng = np.random.default_rng(seed + 1000 * sq + skv)
  q, kv = np.arange(sq)[:, None], np.arange(skv)[None]
  start = rng.integers(0, skv, sq)[:, None]
  return (((kv <= q) & (kv > q - 24)) | (kv < 3)
          | ((kv >= start) & (kv < start + 10) & (kv <= q)))


def one_run_rows(sq, skv, seed=0):
  """A boolean [sq, skv] array: row q is True on one random run of keys (empty for about
  one row in six), deterministic per shape."""
  rng = np.random.default_rng(seed + 1000 * sq + skv)
  lo = rng.integers(0, skv, sq)
  length = np.where(rng.random(sq) < 1 / 6, 0, rng.integers(1, max(2, skv // 2), sq))
  kv = np.arange(skv)[None]
  return (kv >= lo[:, None]) & (kv < (lo + length)[:, None])


# A stable function object, so block maps are cached across examples.
SEQ_MASKS_CACHE: dict = {}


def seq_mask(name, sq, skv):
  key = (name, sq, skv)
  if key not in SEQ_MASKS_CACHE:
    SEQ_MASKS_CACHE[key] = SEQ_MASKS[name](sq, skv)
  return SEQ_MASKS_CACHE[key]


@st.composite
def seq_problems(draw, max_len=70, dtypes=(jnp.float32,)):
  sq = draw(st.integers(1, max_len))
  self_attn = draw(st.booleans())
  skv = sq if self_attn else draw(st.integers(1, max_len))
  kv_heads = draw(st.sampled_from([1, 2]))
  heads = kv_heads * draw(st.sampled_from([1, 2]))
  return dict(
      batch=draw(st.integers(1, 2)), sq=sq, skv=skv, heads=heads, kv_heads=kv_heads,
      head_dim=draw(st.sampled_from([16, 32])), mask=draw(st.sampled_from(sorted(SEQ_MASKS))),
      segments=self_attn and draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
      seed=draw(st.integers(0, 2**16)))


def assert_grads(grads, want, floors, tol, dtype, names="qkv", view=lambda x: x):
  """Each gradient (``view`` of it) within ``2 tol`` relative L2 of the float64 brute force
  `want`, plus two unit roundoffs of `dtype` (eps / 2) times its floor
  (`brute_force.attention_grads(magnitudes=True)`). The floor is the rowsum's: every flash
  backward takes rowsum(dO ∘ O) from the output it stored (rounded), and where a row's dS =
  P ∘ (dP − rowsum) cancels (one key with nearly all the weight, or dP nearly equal across
  the row's keys) that rounding alone moves bfloat16 dQ/dK by 5–30% on single-row problems
  (random sweeps, 2026-12-07). Gradients that are zero in theory are judged absolutely
  (`_small`)."""
  unit = float(jnp.finfo(dtype).eps) / 2
  for name, got, ref, floor in zip(names, grads, want, floors, strict=True):
    got = np.asarray(view(got), np.float64)
    assert not np.any(np.isnan(got)), (name, "NaN")
    err, norm = float(np.linalg.norm(got - ref)), float(np.linalg.norm(ref))
    assert err <= 2 * tol * norm + unit * floor or _small(got, ref, tol), (
        name, err / max(norm, 1e-30))


def _small(got, ref, tol):
  """Gradients that are exactly zero in theory (one visible key) are judged absolutely."""
  diff = np.asarray(got, np.float64) - ref
  return np.linalg.norm(ref) < 1e-6 and np.abs(diff).max() < tol


def make_inputs(p, spatial=None):
  rng = np.random.default_rng(p["seed"])
  qshape = (p["batch"],) + (spatial or (p["sq"],)) + (p["heads"], p["head_dim"])
  kshape = (p["batch"],) + (spatial or (p["skv"],)) + (p["kv_heads"], p["head_dim"])
  q = jnp.asarray(rng.standard_normal(qshape) * p.get("q_std", 1.0), p["dtype"])
  k = jnp.asarray(rng.standard_normal(kshape), p["dtype"])
  v = jnp.asarray(rng.standard_normal(kshape), p["dtype"])
  d_out = jnp.asarray(rng.standard_normal(qshape), p["dtype"])
  return q, k, v, d_out, rng


def outputs_and_grads(run, d_out, *args, argnums=None):
  """``run(*args)`` and the gradients of sum(out · d_out) (out: its first output) from one
  jitted call: an interpret-mode kernel's forward runs once, not once for the outputs and
  again under the gradient."""
  argnums = tuple(range(len(args))) if argnums is None else argnums

  def loss(*a):
    res = run(*a)
    out = res[0] if isinstance(res, tuple) else res
    return jnp.sum(out.astype(jnp.float32) * jnp.asarray(d_out, jnp.float32)), res

  grads, res = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(*args)
  return res, grads


def check_attention(p, backend, **kwargs):
  """Forward, lse and gradients of `attention` vs the float64 brute force (with
  ``logits_soft_cap`` among `kwargs`, against the capped brute force)."""
  q, k, v, d_out, rng = make_inputs(p)
  sq, skv = p["sq"], p["skv"]
  mask = seq_mask(p["mask"], sq, skv)
  seg = None
  if p["segments"]:
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (p["batch"], sq)), axis=1), jnp.int32)
  scale = 1.0 / math.sqrt(p["head_dim"])
  dense = np.asarray(mask(np.arange(sq)[:, None], np.arange(skv)[None, :]))
  cap = kwargs.get("logits_soft_cap")
  want, want_lse = brute_force.attention(q, k, v, dense, scale, seg, seg, cap=cap)

  def run(q, k, v):
    return jsa.attention(q, k, v, mask, segment_ids=seg, backend=backend, return_lse=True,
                         **kwargs)

  (out, lse), grads = outputs_and_grads(run, d_out, q, k, v)
  tol = TOL[p["dtype"]]
  assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (p["batch"], sq, p["heads"])
  assert brute_force.rel_err(out, want) < tol
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=tol * 10, rtol=tol)
  assert np.all(np.asarray(out, np.float32)[~finite.transpose(0, 1, 2)] == 0)
  want_grads, floors = brute_force.attention_grads(q, k, v, dense, scale, d_out, seg, seg,
                                                   cap=cap, magnitudes=True)
  assert all(g.dtype == q.dtype for g in grads)
  assert_grads(grads, want_grads, floors, tol, q.dtype)


@st.composite
def na_problems(draw, dtypes=(jnp.float32,)):
  problem = draw(gna_problems(max_ndim=3, max_len=9))
  kv_heads = draw(st.sampled_from([1, 2]))
  return dict(problem=problem, batch=1, heads=kv_heads * draw(st.sampled_from([1, 2])),
              kv_heads=kv_heads, head_dim=16, dtype=draw(st.sampled_from(dtypes)),
              seed=draw(st.integers(0, 2**16)),
              tile_q=tuple(draw(st.sampled_from([1, 2, 4])) for _ in problem[0]),
              tile_kv=tuple(draw(st.sampled_from([1, 2, 4])) for _ in problem[0]))


def check_na(p, backend, **kwargs):
  spatial, kernel, stride, dilation, causal = p["problem"]
  q, k, v, d_out, _ = make_inputs(p, spatial)
  dense = brute_force.gna_mask(*p["problem"])
  n = int(np.prod(spatial))
  flat = lambda x: x.reshape(x.shape[0], n, *x.shape[-2:])
  scale = 1.0 / math.sqrt(p["head_dim"])
  cap = kwargs.get("logits_soft_cap")
  want, want_lse = brute_force.attention(flat(q), flat(k), flat(v), dense, scale, cap=cap)
  if backend != "reference" and p["tile_q"] is not None:
    kwargs = dict(q_tile_shape=p["tile_q"], kv_tile_shape=p["tile_kv"], **kwargs)

  def run(q, k, v):
    return jsa.na(q, k, v, kernel, stride, dilation, causal, backend=backend,
                  return_lse=True, **kwargs)

  (out, lse), grads = outputs_and_grads(run, d_out, q, k, v)
  tol = TOL[p["dtype"]]
  assert out.shape == q.shape and lse.shape == q.shape[:-1]
  assert brute_force.rel_err(flat(out), want) < tol
  np.testing.assert_allclose(np.asarray(lse).reshape(want_lse.shape), want_lse,
                             atol=tol * 10, rtol=tol)
  want_grads, floors = brute_force.attention_grads(flat(q), flat(k), flat(v), dense, scale,
                                                   flat(d_out), cap=cap, magnitudes=True)
  assert_grads(grads, want_grads, floors, tol, q.dtype, view=flat)


def spy(monkeypatch, owner, name: str, record) -> list:
  """``owner.name`` wrapped for the test: ``record(args, kwargs, result)`` of every call from
  now on appended to the returned list; the op cache is cleared so that the next call plans
  (and traces) again."""
  from jax_sparse_attn import ops
  calls, real = [], getattr(owner, name)

  def wrapper(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(record(args, kwargs, result))
    return result

  monkeypatch.setattr(owner, name, wrapper)
  ops._make_core.cache_clear()
  return calls


def spy_run_plans(monkeypatch) -> list:
  """(forward plan, backward plan or None) of every `ops.run_plan` call from now on."""
  from jax_sparse_attn import ops
  return spy(monkeypatch, ops, "run_plan", lambda a, kw, _: (a[1], kw.get("bwd_plan")))


def spy_backward_kernels(monkeypatch) -> list:
  """The keyword arguments of every Hopper dK/dV kernel trace (`attention_bwd._kernel`:
  stages, with_dq, split_dq, mma_width, ...) from now on."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  return spy(monkeypatch, attention_bwd, "_kernel", lambda a, kw, _: kw)


def spy_backward_plans(monkeypatch) -> list:
  """The plans `ops._backward_plan` returns from now on (the backward's own plan, or None)."""
  from jax_sparse_attn import ops
  return spy(monkeypatch, ops, "_backward_plan", lambda a, kw, plan: plan)
