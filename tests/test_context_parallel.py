"""Context parallelism on 8 forced host devices: ring, halo and all-gather attention against
the unsharded op (forward and gradients), the collectives in the compiled HLO, the planner's
decisions, merge_attentions, and bad input."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import backend_cases
import brute_force
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn import context_parallel as cp
from jax_sparse_attn import masks

AUTO = jax.sharding.AxisType.Auto


def _mesh(context: int, other: str = "data"):
  if context == 8:
    return jax.make_mesh((8,), ("context",), axis_types=(AUTO,))
  return jax.make_mesh((8 // context, context), (other, "context"), axis_types=(AUTO,) * 2)


def _inputs(seed, shape_q, shape_kv, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  make = lambda s: jnp.asarray(rng.standard_normal(s), dtype)
  return make(shape_q), make(shape_kv), make(shape_kv), make(shape_q), rng


def _value_and_grads(fn, q, k, v, d_out):
  """(out, dq, dk, dv) of fn with d_out, from one jitted call (op by op, interpret-mode
  kernels and the shard loops dispatch one small program each)."""
  out, grads = backend_cases.outputs_and_grads(fn, d_out, q, k, v)
  return (out,) + tuple(grads)


def _assert_close(got, want, tol, what=""):
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert not np.any(np.isnan(np.asarray(g, np.float32))), f"{what} {name}: NaN"
    if np.linalg.norm(np.asarray(w, np.float64)) < 1e-6:  # zero in theory (one visible key)
      assert np.abs(np.asarray(g, np.float64)).max() < tol, f"{what} {name}: not zero"
      continue
    err = brute_force.rel_err(g, w)
    assert err < tol, f"{what} {name}: rel err {err}"


# --------------------------------------------------------------------------------------------
# merge_attentions


def test_merge_attentions_equals_attention_over_the_union():
  q, k, v, d_out, _ = _inputs(0, (2, 24, 4, 16), (2, 40, 2, 16))
  mask = masks.causal(offset=16)
  # Keys split into two disjoint sets by index parity: each part is a masked attention.
  even = masks.from_function(lambda qi, ki: ki % 2 == 0)
  odd = masks.from_function(lambda qi, ki: ki % 2 == 1)

  def merged(q, k, v):
    parts = [jsa.attention(q, k, v, mask & m, backend="xla", return_lse=True) for m in (even, odd)]
    return jsa.merge_attentions([p[0] for p in parts], [p[1] for p in parts])

  def whole(q, k, v):
    return jsa.attention(q, k, v, mask, backend="xla", return_lse=True)

  (out, lse), vjp_m = jax.vjp(merged, q, k, v)
  (want, want_lse), vjp_w = jax.vjp(whole, q, k, v)
  assert brute_force.rel_err(out, want) < 1e-5
  assert brute_force.rel_err(lse, want_lse) < 1e-5
  d_lse = jnp.asarray(np.random.default_rng(1).standard_normal(lse.shape), jnp.float32)
  for g, w in zip(vjp_m((d_out, d_lse)), vjp_w((d_out, d_lse))):
    assert brute_force.rel_err(g, w) < 1e-5


def test_merge_attentions_rows_that_see_nothing():
  out = jnp.ones((1, 3, 2, 4))
  lse = jnp.array([[[-jnp.inf, 0.5], [-jnp.inf, -jnp.inf], [1.0, -jnp.inf]]])
  f = lambda o, l: jsa.merge_attentions([o, 2 * o], [l, l])
  merged, merged_lse = f(out, lse)
  assert np.all(np.asarray(merged[0, 1]) == 0) and np.all(np.isneginf(merged_lse[0, 1]))
  np.testing.assert_allclose(merged[0, 0, 1], 1.5)
  np.testing.assert_allclose(merged_lse[0, 0, 1], 0.5 + np.log(2), rtol=1e-6)
  grads = jax.grad(lambda o, l: jnp.sum(jnp.where(jnp.isfinite(f(o, l)[1]), f(o, l)[1], 0.0))
                   + jnp.sum(f(o, l)[0]), argnums=(0, 1))(out, lse)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_merge_attentions_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same length"):
    jsa.merge_attentions([jnp.ones((1, 2, 3, 4))], [])
  with pytest.raises(ValueError, match=r"lses\[0\]"):
    jsa.merge_attentions([jnp.ones((1, 2, 3, 4))], [jnp.ones((1, 2, 4))])


# --------------------------------------------------------------------------------------------
# 1-D sequences: every strategy against the unsharded op.

SEQ_CASES = {
    "causal": masks.causal(),
    "causal_window": masks.causal() & masks.sliding_window(11),
    "window": masks.sliding_window(9, 5),
    "block_local": masks.block_local(8, 3),
    "window_sink": masks.causal() & (masks.sliding_window(5) | masks.sink(2)),
    "function": masks.from_function(lambda q, k: (q + 2 * k) % 3 != 0),
    "full": masks.full(),
}


def _check_sequence(mask_name, strategy, layout, context, chunk, heads, kv_heads, segments,
                    seed, backend="xla", tol=2e-5, dtype=jnp.float32, mesh=None, **kw):
  mesh = mesh or _mesh(context)
  seq = chunk * context * (2 if layout == "zigzag" else 1)
  mask = SEQ_CASES[mask_name]
  q, k, v, d_out, rng = _inputs(seed, (2, seq, heads, 16), (2, seq, kv_heads, 16), dtype)
  seg = (jnp.asarray(np.sort(rng.integers(0, 3, (2, seq)), axis=1), jnp.int32)
         if segments else None)

  def sharded(q, k, v):
    return jsa.attention(q, k, v, mask, segment_ids=seg, backend=backend, mesh=mesh,
                         context_axis="context", strategy=strategy, context_layout=layout, **kw)

  def single(q, k, v):
    return jsa.attention(q, k, v, mask, segment_ids=seg, backend=backend, **kw)

  if layout == "zigzag":
    perm = cp.zigzag_permutation(seq, context)
    seg = None if seg is None else seg[:, perm]
    got = _value_and_grads(jax.jit(sharded), *(x[:, perm] for x in (q, k, v, d_out)))
    inv = np.argsort(perm)
    got = tuple(x[:, inv] for x in got)
    seg = None if seg is None else seg[:, inv]
  else:
    got = _value_and_grads(jax.jit(sharded), q, k, v, d_out)
  want = _value_and_grads(single, q, k, v, d_out)
  _assert_close(got, want, tol, f"{mask_name}/{strategy}/{layout}")


@pytest.mark.parametrize("mask_name, strategy, layout", [
    ("causal", "ring", "contiguous"),
    ("causal", "ring", "zigzag"),
    ("causal", "allgather", "zigzag"),
    ("causal_window", "halo", "contiguous"),
    ("window", "halo", "contiguous"),
    ("block_local", "halo", "contiguous"),
    ("window_sink", "ring", "contiguous"),
    ("function", "allgather", "contiguous"),
])
def test_sequence_strategies(mask_name, strategy, layout):
  _check_sequence(mask_name, strategy, layout, context=4, chunk=16, heads=4, kv_heads=2,
                  segments=mask_name in ("causal", "window"), seed=3)


@pytest.mark.parametrize("strategy, layout", [("ring", "contiguous"), ("allgather", "zigzag")])
def test_sequence_row_bounds(monkeypatch, strategy, layout):
  """An explicit array of one run per row (`masks.RowBounds`) sharded like any interval mask:
  each shard's rows and keys looked up at their global positions."""
  from backend_cases import one_run_rows
  seq = 16 * 4 * (2 if layout == "zigzag" else 1)
  monkeypatch.setitem(SEQ_CASES, "array_rows", masks.from_array(one_run_rows(seq, seq)))
  _check_sequence("array_rows", strategy, layout, context=4, chunk=16, heads=4, kv_heads=2,
                  segments=True, seed=5)


@pytest.mark.parametrize("strategy, layout, backend", [("ring", "contiguous", "xla"),
                                                      ("allgather", "zigzag", "xla"),
                                                      ("ring", "contiguous", "triton")])
def test_sequence_array_runs(monkeypatch, strategy, layout, backend):
  """An explicit array of 1-3 runs per row (a union of row bounds) sharded: the kernels test
  each shard's union vectors, which hold global positions (Triton through
  `plan.intervals_per_term`); the call really runs sharded."""
  from backend_cases import several_run_rows
  seq = 16 * 4 * (2 if layout == "zigzag" else 1)
  mask = masks.from_array(several_run_rows(seq, seq))
  assert isinstance(mask, masks.Or)
  monkeypatch.setitem(SEQ_CASES, "array_runs", mask)
  kw = dict(interpret=True, tol=2e-3) if backend == "triton" else {}
  _check_sequence("array_runs", strategy, layout, context=4, chunk=16, heads=4, kv_heads=2,
                  segments=True, seed=6, backend=backend, **kw)
  x = jnp.ones((2, seq, 4, 16))
  jaxpr = str(jax.make_jaxpr(lambda q: jsa.attention(
      q, x, x, mask, backend="xla", mesh=_mesh(4), context_axis="context",
      strategy=strategy, context_layout=layout))(x))
  assert "shard_map" in jaxpr and ("ppermute" if strategy == "ring" else "all_gather") in jaxpr


@settings(max_examples=examples(3))
@given(mask_name=st.sampled_from(sorted(SEQ_CASES)),
       strategy=st.sampled_from(["auto", "ring", "halo", "allgather"]),
       zigzag=st.booleans(), context=st.sampled_from([2, 4, 8]), chunk=st.sampled_from([8, 12, 20]),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), segments=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sequence_randomized(mask_name, strategy, zigzag, context, chunk, kv_heads, group,
                             segments, seed):
  layout = "zigzag" if zigzag and strategy != "halo" else "contiguous"
  seq = chunk * context * (2 if layout == "zigzag" else 1)
  try:
    cp.plan_context(SEQ_CASES[mask_name], seq, seq, context, 8, 8, strategy, layout)
  except ValueError as e:  # halo on a mask that reaches every shard: a clear error
    assert strategy == "halo" and "bounded reach" in str(e)
    return
  _check_sequence(mask_name, strategy, layout, context, chunk, kv_heads * group, kv_heads,
                  segments, seed, block_q=8, block_kv=8)


@pytest.mark.parametrize("mask, strategy, layout, context, chunk, kv_heads, segments, seed", [
    # Elementwise masks: the kernels evaluate them on positions of the shard (masks.Remapped).
    ("window_sink", "ring", "zigzag", 2, 16, 1, False, 9),
    # (the causal ring on kernels: test_sequence_tpu_interpret, test_emulated_ring)
    pytest.param("causal", "ring", "contiguous", 2, 32, 1, False, 4,
                 marks=pytest.mark.extended),
    ("causal_window", "halo", "contiguous", 4, 16, 2, True, 5)])
def test_sequence_triton_interpret(mask, strategy, layout, context, chunk, kv_heads, segments,
                                   seed):
  _check_sequence(mask, strategy, layout, context=context, chunk=chunk, heads=2,
                  kv_heads=kv_heads, segments=segments, seed=seed, backend="triton",
                  interpret=True, block_q=16, block_kv=16, tol=1e-4)


@pytest.mark.parametrize("strategy, layout", [("ring", "zigzag")])
def test_sequence_triton_interpret_documents(strategy, layout):
  """Segment ids on shards: each shard's plan gets the runtime map of its documents
  (cross-document blocks skipped, full blocks untested), against one device."""
  _check_sequence("causal", strategy, layout, context=2, chunk=32, heads=2, kv_heads=1,
                  segments=True, seed=11, backend="triton", interpret=True, block_q=16,
                  block_kv=16, tol=1e-4)


def test_sequence_low_precision():
  _check_sequence("causal", "ring", "zigzag", context=4, chunk=16, heads=2, kv_heads=1,
                  segments=False, seed=6, dtype=jnp.bfloat16, tol=2e-2)


def test_fully_masked_rows_are_zero_not_nan():
  # causal(offset=-40): the first 40 queries see nothing; whole shards of them.
  mesh = _mesh(4)
  q, k, v, d_out, _ = _inputs(7, (2, 64, 2, 16), (2, 64, 2, 16))
  mask = masks.causal(offset=-40)
  for strategy in ("ring", "allgather"):
    f = jax.jit(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla", mesh=mesh,
                                              context_axis="context", strategy=strategy))
    out, dq, dk, dv = _value_and_grads(f, q, k, v, d_out)
    assert np.all(np.asarray(out[:, :40]) == 0) and np.all(np.asarray(dq[:, :40]) == 0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in (out, dq, dk, dv))


# --------------------------------------------------------------------------------------------
# Neighborhoods: the leading spatial dim sharded.

NA_CASES = [
    # spatial, kernel, stride, dilation, causal, strategy, context
    ((16,), 5, 1, 1, False, "halo", 4),
    ((16,), 4, 2, 2, True, "halo", 2),
    ((8, 6, 5), (3, 3, 3), 1, 1, False, "auto", 4),
    ((8, 7), (5, 3), (2, 1), 1, (True, False), "halo", 4),
    ((16, 5), (5, 3), (2, 1), (2, 1), False, "halo", 2),
    ((8, 6), (8, 3), (4, 1), 1, (True, False), "allgather", 4),
    ((8, 4, 6), (4, 3, 5), (2, 1, 3), (1, 1, 1), (True, False, False), "halo", 8),
]


def _check_na(spatial, kernel, stride, dilation, causal, strategy, context, seed=0,
              backend="xla", tol=2e-5, dtype=jnp.float32, head_dim=16, padded=False, **kw):
  mesh = _mesh(context, other="model")
  q, k, v, d_out, rng = _inputs(seed, (2,) + spatial + (4, head_dim),
                                (2,) + spatial + (2, head_dim), dtype)
  args = (kernel, stride, dilation, causal)
  if padded:  # a padding mask and two packed segments (ids travel with the halos)
    kw = dict(kw, kv_valid=jnp.asarray(rng.random((2,) + spatial) < 0.7),
              segment_ids=jnp.asarray(rng.integers(0, 2, (2,) + spatial), jnp.int32))
  masked = {n: kw.pop(n) for n in ("kv_valid", "segment_ids") if n in kw}
  sharded = jax.jit(lambda q, k, v: jsa.na(q, k, v, *args, backend=backend, mesh=mesh,
                                           context_axis="context", strategy=strategy,
                                           **masked, **kw))
  got = _value_and_grads(sharded, q, k, v, d_out)
  want = _value_and_grads(lambda q, k, v: jsa.na(q, k, v, *args, backend="reference",
                                                 **masked), q, k, v, d_out)
  _assert_close(got, want, tol, f"{spatial} {args} {strategy}")


@pytest.mark.parametrize("case", NA_CASES)
def test_na_context_parallel(case):
  _check_na(*case)


@settings(max_examples=examples(3))
@given(p=backend_cases.na_problems(), context=st.sampled_from([2, 4]),
       strategy=st.sampled_from(["auto", "halo", "allgather"]), padded=st.booleans())
def test_na_randomized(p, context, strategy, padded):
  spatial, kernel, stride, dilation, causal = p["problem"]
  spatial = (spatial[0] * context,) + tuple(spatial[1:])  # the leading dim divides
  try:
    mask = masks.neighborhood(spatial, kernel, stride, dilation, causal)
    cp.plan_context_nd(mask, context, (1,) * len(spatial), (1,) * len(spatial), strategy)
  except ValueError as e:
    assert strategy == "halo" and "every other shard" in str(e)
    return
  _check_na(spatial, kernel, stride, dilation, causal, strategy, context, seed=p["seed"],
            padded=padded)


def test_sequence_tpu_interpret():
  # Every device runs a kernel at every step of a zigzag ring. (TPU interpret mode appears to
  # wait for all devices at each kernel: a step where one device has no kernel, like a halo
  # past the sequence start, stalls there; the halo runs through `emulate` below.) A mesh of
  # the two devices the ring needs: with all 8 host devices (4 idle data shards) the TPU
  # interpreter's all-device barrier once aborted the process on a loaded 2-core machine.
  two = jax.make_mesh((2,), ("context",), axis_types=(AUTO,), devices=jax.devices()[:2])
  _check_sequence("causal", "ring", "zigzag", context=2, chunk=128, heads=2, kv_heads=1,
                  segments=True, seed=1, backend="mosaic", interpret=True, block_q=128,
                  block_kv=128, tol=1e-4, mesh=two)


def test_emulated_tpu_halo():
  q, k, v, d_out, _ = _inputs(12, (1, 512, 2, 32), (1, 512, 1, 32))
  mask = masks.causal() & masks.sliding_window(40)
  plan = cp.plan_context(mask, 512, 512, 2, 128, 128, "halo")
  assert plan.halo == (40, 0)
  got = _value_and_grads(lambda q, k, v: cp.emulate(plan, q, k, v, "mosaic", interpret=True),
                         q, k, v, d_out)
  want = _value_and_grads(lambda q, k, v: jsa.attention(q, k, v, mask, backend="reference"),
                          q, k, v, d_out)
  _assert_close(got, want, 1e-4, "mosaic halo")


# extended: the Hopper forward's plain halo slab (test_emulated_shards_padding_mask runs the
# same shard plans on it with segment ids)
@pytest.mark.parametrize("backend", [pytest.param("mosaic_gpu", marks=pytest.mark.extended),
                                     "xla"])
def test_emulated_halo(backend):
  """Every shard's local kernels on one device (`context_parallel.emulate`): the Hopper
  forward (Mosaic GPU interpret mode; its interpreter does not run on 8 host devices at
  once) and Triton backward on a halo plan: a 4-frame slab against 1-frame halos (Q and K/V
  grids differ) with 12-wide rows (not TMA boxes: the permuted path)."""
  kw = dict(interpret=True) if backend == "mosaic_gpu" else {}
  spatial, kernel = (8, 8, 12), (3, 5, 5)
  q, k, v, d_out, _ = _inputs(10, (1,) + spatial + (2, 64), (1,) + spatial + (1, 64),
                              jnp.bfloat16)
  mask = masks.neighborhood(spatial, kernel)
  plan = cp.plan_context_nd(mask, 2, (2, 8, 8), (1, 8, 8), "halo")
  assert plan.halo == (1, 1) and plan.steps == 3
  got = _value_and_grads(lambda q, k, v: cp.emulate(plan, q, k, v, backend, **kw), q, k, v,
                         d_out)
  want = _value_and_grads(lambda q, k, v: jsa.na(q, k, v, kernel, backend="reference"),
                          q, k, v, d_out)
  _assert_close(got, want, 2e-2, f"{backend} halo")


@pytest.mark.parametrize("backend", ["mosaic_gpu", "xla"])
def test_emulated_ring(backend):
  """A zigzag causal ring's local kernels on one device (`emulate`): the Hopper forward in
  interpret mode and Triton's backward on each step's shard plan."""
  kw = dict(interpret=True) if backend == "mosaic_gpu" else {}
  q, k, v, d_out, _ = _inputs(11, (1, 512, 2, 64), (1, 512, 1, 64), jnp.bfloat16)
  plan = cp.plan_context(masks.causal(), 512, 512, 2, 128, 64, "ring", "zigzag")
  got = _value_and_grads(lambda q, k, v: cp.emulate(plan, q, k, v, backend, layout="zigzag",
                                                    **kw), q, k, v, d_out)
  want = _value_and_grads(lambda q, k, v: jsa.attention(q, k, v, masks.causal(),
                                                        backend="reference"), q, k, v, d_out)
  _assert_close(got, want, 2e-2, f"{backend} ring")


def test_emulated_ring_array_runs():
  """A zigzag ring over an array of 1-3 runs per row on the Hopper kernels (interpret mode,
  `emulate`): each shard's union test on global positions, forward and backward."""
  from backend_cases import several_run_rows
  mask = masks.from_array(several_run_rows(512, 512))
  q, k, v, d_out, _ = _inputs(11, (1, 512, 2, 64), (1, 512, 1, 64), jnp.bfloat16)
  plan = cp.plan_context(mask, 512, 512, 2, 128, 64, "ring", "zigzag")
  got = _value_and_grads(lambda q, k, v: cp.emulate(plan, q, k, v, "mosaic_gpu",
                                                    layout="zigzag", interpret=True),
                         q, k, v, d_out)
  want = _value_and_grads(lambda q, k, v: jsa.attention(q, k, v, mask, backend="reference"),
                          q, k, v, d_out)
  _assert_close(got, want, 2e-2, "mosaic_gpu ring, array runs")


def test_emulated_shards_padding_mask():
  """A padding mask and packed images on shard plans (`emulate`'s segment ids): the Hopper
  forward's segment test on slabs and halos whose key grid starts before the array (the
  other backends run these on the 8 host devices above)."""
  from jax_sparse_attn import ops
  backend, kw = "mosaic_gpu", dict(interpret=True)
  spatial, kernel = (8, 8, 12), (3, 5, 5)
  q, k, v, d_out, rng = _inputs(16, (1,) + spatial + (2, 64), (1,) + spatial + (1, 64),
                                jnp.bfloat16)
  valid = jnp.asarray(rng.random((1,) + spatial) < 0.7)
  seg = jnp.asarray(np.arange(8)[None, :, None, None] >= 5, jnp.int32) * jnp.ones(
      (1,) + spatial, jnp.int32)  # two clips: frames 0-4 and 5-7
  qs, ks = ops._na_segments(valid, seg, (1,) + spatial, "")
  plan = cp.plan_context_nd(masks.neighborhood(spatial, kernel), 2, (2, 8, 8), (1, 8, 8),
                            "halo")
  got = _value_and_grads(lambda q, k, v: cp.emulate(plan, q, k, v, backend, q_seg=qs,
                                                    kv_seg=ks, **kw), q, k, v, d_out)
  want = _value_and_grads(lambda q, k, v: jsa.na(q, k, v, kernel, kv_valid=valid,
                                                 segment_ids=seg, backend="reference"),
                          q, k, v, d_out)
  _assert_close(got, want, 2e-2, f"{backend} halo, padded")


def test_na_triton_interpret_backward_tiles(monkeypatch):
  # Default tiles: the Triton backward runs on its own tiles on every shard plan too.
  built = backend_cases.spy_backward_plans(monkeypatch)
  _check_na((8, 8, 16), (3, 5, 5), 1, 1, False, "halo", 2, backend="triton", interpret=True,
            tol=1e-4)
  assert built and all(p is not None and p.q_layout.origin for p in built)


def test_na_triton_interpret():
  _check_na((8, 8), (3, 5), (1, 2), 1, (True, False), "halo", 4, backend="triton",
            interpret=True, block_q=16, block_kv=16, tol=1e-4)


# --------------------------------------------------------------------------------------------
# Compiled collectives.


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def _count(text, op):
  return len(re.findall(rf"= \S+ {op}(-start)?\(", text))


def test_halo_hlo_has_collective_permutes_and_no_all_gather():
  mesh = _mesh(4)
  x = jnp.ones((2, 256, 2, 16))
  text = _hlo(lambda q: jsa.attention(q, q, q, masks.sliding_window(20, 20), backend="xla",
                                      mesh=mesh, context_axis="context", strategy="halo"), x)
  assert _count(text, "collective-permute") > 0
  assert _count(text, "all-gather") == 0
  y = jnp.ones((1, 8, 6, 6, 2, 16))
  text = _hlo(lambda q: jsa.na(q, q, q, (3, 5, 5), backend="xla", mesh=mesh,
                               context_axis="context", strategy="halo"), y)
  assert _count(text, "collective-permute") > 0 and _count(text, "all-gather") == 0


@pytest.mark.parametrize("mask, steps", [(masks.causal(), 4),
                                         (masks.causal() & masks.sliding_window(30), 2),
                                         (masks.block_local(64), 1)])
def test_ring_sends_only_needed_steps(mask, steps):
  mesh = _mesh(4)
  q, k, v, _, _ = _inputs(0, (2, 256, 2, 16), (2, 256, 2, 16))
  plan = cp.plan_context(mask, 256, 256, 4, 64, 64, "ring")
  assert plan.steps == steps and plan.sends == steps - 1
  text = _hlo(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla", mesh=mesh,
                                            context_axis="context", strategy="ring"), q, k, v)
  assert _count(text, "collective-permute") == 2 * (steps - 1)  # K and V per send


def test_causal_ring_compiles_three_local_problems():
  for n in (2, 4, 8):
    plan = cp.plan_context(masks.causal(), 1024, 1024, n, 64, 64, "ring", "zigzag")
    assert len(plan.plans) == 3 and plan.steps == n
  plan = cp.plan_context(masks.causal(), 1024, 1024, 8, 64, 64, "ring")
  assert len(plan.plans) == 2  # diagonal and full; empty pairs compute nothing


def test_batch_and_head_sharding_needs_no_all_gather():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO,) * 2)
  q, k, v, _, _ = _inputs(8, (4, 64, 8, 16), (4, 64, 4, 16))
  spec = NamedSharding(mesh, P("data", None, "model", None))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
  f = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="xla", mesh=mesh)
  text = _hlo(f, q, k, v)
  assert _count(text, "all-gather") == 0 and _count(text, "collective-permute") == 0
  out = jax.jit(f)(q, k, v)
  assert out.sharding.spec == P("data", None, "model", None)
  want = jsa.attention(q, k, v, masks.causal(), backend="xla", mesh=jax.make_mesh((1,), ("x",)))
  assert brute_force.rel_err(out, want) < 1e-6
  # The same under jax.set_mesh, no mesh argument.
  with jax.set_mesh(mesh):
    assert brute_force.rel_err(jax.jit(lambda q, k, v: jsa.attention(
        q, k, v, masks.causal(), backend="xla"))(q, k, v), want) < 1e-6


def test_context_axis_of_size_one_has_no_collectives():
  mesh = jax.make_mesh((8, 1), ("data", "context"), axis_types=(AUTO,) * 2)
  x = jnp.ones((8, 128, 2, 16))
  text = _hlo(lambda q: jsa.attention(q, q, q, masks.causal(), backend="xla", mesh=mesh,
                                      context_axis="context"), x)
  for op in ("all-gather", "collective-permute", "all-reduce", "all-to-all"):
    assert _count(text, op) == 0, op


# --------------------------------------------------------------------------------------------
# The planner's decisions.


def test_auto_strategy_choice():
  # A window that reaches less than a shard: halo.
  plan = cp.plan_context(masks.causal() & masks.sliding_window(2047), 32768, 32768, 8, 128,
                         128, kv_row_bytes=2 * 16 * 128 * 2, head_dim=128, batch_heads=16)
  assert plan.strategy == "halo" and plan.halo == (2047, 0)
  # Long causal: the ring hides its sends under compute.
  plan = cp.plan_context(masks.causal(), 262144, 262144, 8, 128, 128,
                         kv_row_bytes=2 * 16 * 128 * 2, head_dim=128, batch_heads=16)
  assert plan.strategy == "ring"
  assert plan.estimates["ring"] < plan.estimates["allgather"]
  # Short sequence, one KV head: per-step kernels too small to hide sends: all-gather.
  plan = cp.plan_context(masks.causal(), 2048, 2048, 8, 128, 128,
                         kv_row_bytes=2 * 1 * 128 * 2, head_dim=128, batch_heads=16)
  assert plan.strategy == "allgather"


def test_estimate_model():
  hw = cp.Hardware(link_bytes_per_s=1e9, flops_per_s=1e12, collective_s=0.0)
  work = np.array([[1e9, 2e9], [3e9, 0.0]])  # [steps, shards]
  # Ring: step 0 overlaps the 1 ms kernel... max(2 ms, send 1 ms) + step 1 3 ms.
  assert cp.estimate("ring", work, 1e6, 1, 0, hw) == pytest.approx(5e-3)
  assert cp.estimate("allgather", work, 1e6, 1, 0, hw) == pytest.approx(1e-3 + 4e-3)
  # Halo (rows: own K/V, halo): the 0.5 ms exchange hides under the 2 ms own-K/V kernel.
  assert cp.estimate("halo", work, 1e6, 1, 5e5, hw) == pytest.approx(2e-3 + 3e-3)
  assert cp.estimate("halo", work, 1e6, 1, 5e6, hw) == pytest.approx(5e-3 + 3e-3)


def test_zigzag_round_trip():
  x = jnp.arange(2 * 32).reshape(2, 32)
  z = cp.to_zigzag(x, 4)
  assert list(np.asarray(z[0, :8])) == [0, 1, 2, 3, 28, 29, 30, 31]
  assert np.array_equal(cp.from_zigzag(z, 4), x)


# --------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input():
  mesh = _mesh(4)
  x = jnp.ones((2, 64, 2, 16))
  with pytest.raises(ValueError, match="context_axis 'seq' is not an axis"):
    jsa.attention(x, x, x, backend="xla", mesh=mesh, context_axis="seq")
  with pytest.raises(ValueError, match="seq_q=66 must be divisible by 4"):
    y = jnp.ones((2, 66, 2, 16))
    jsa.attention(y, y, y, backend="xla", mesh=mesh, context_axis="context")
  with pytest.raises(ValueError, match="strategy='halo' needs a mask"):
    jsa.attention(x, x, x, masks.causal(), backend="xla", mesh=mesh, context_axis="context",
                  strategy="halo")
  with pytest.raises(ValueError, match="strategy must be one of"):
    jsa.attention(x, x, x, backend="xla", strategy="tree")
  with pytest.raises(ValueError, match="context_layout must be one of"):
    jsa.attention(x, x, x, backend="xla", context_layout="strided")
  with pytest.raises(ValueError, match="zigzag' needs a mesh"):
    jsa.attention(x, x, x, backend="xla", context_layout="zigzag")
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    jsa.attention(x, x, x, backend="xla", mesh="data")
  y = jnp.ones((2, 8, 8, 2, 16))
  with pytest.raises(ValueError, match="strategy='ring' is for 1-D"):
    jsa.na(y, y, y, 3, backend="xla", mesh=mesh, context_axis="context", strategy="ring")
  with pytest.raises(ValueError, match="leading spatial dim \\(6\\) must be divisible"):
    z = jnp.ones((2, 6, 8, 2, 16))
    jsa.na(z, z, z, 3, backend="xla", mesh=mesh, context_axis="context")
  with pytest.raises(ValueError, match="every other shard"):
    jsa.na(y, y, y, 7, backend="xla", mesh=mesh, context_axis="context", strategy="halo")


def test_explicit_axes_mesh():
  """`jax.make_mesh`'s default (Explicit) axes: inputs not sharded as the op needs are
  resharded by it; results and gradients as on one device."""
  mesh = jax.make_mesh((2, 4), ("data", "context"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  q, k, v, d_out, _ = _inputs(13, (2, 128, 4, 16), (2, 128, 2, 16))
  mask = masks.causal() & masks.sliding_window(20)
  x = jnp.asarray(np.random.default_rng(14).standard_normal((2, 8, 6, 2, 16)), jnp.float32)
  with jax.set_mesh(mesh):
    got = _value_and_grads(jax.jit(lambda q, k, v: jsa.attention(
        q, k, v, mask, backend="xla", context_axis="context")), q, k, v, d_out)
    got_na = jax.jit(lambda x: jsa.na2d(x, x, x, (3, 3), is_causal=(True, False),
                                        backend="xla", context_axis="context"))(x)
  want = _value_and_grads(lambda q, k, v: jsa.attention(q, k, v, mask, backend="xla"),
                          q, k, v, d_out)
  _assert_close(got, want, 2e-5, "explicit mesh")
  want_na = jsa.na2d(x, x, x, (3, 3), is_causal=(True, False), backend="reference")
  assert brute_force.rel_err(got_na, want_na) < 2e-5


# --------------------------------------------------------------------------------------------
# Neighborhood extras on a mesh.


def test_na_extra_tokens_context_parallel():
  # Video-like grid sharded over 4 devices along its leading dim; text tokens replicated.
  q, k, v, d_out, rng = _inputs(11, (2, 8, 6, 4, 16), (2, 8, 6, 2, 16))
  ek = jnp.asarray(rng.standard_normal((2, 5, 2, 16)), jnp.float32)
  ev = jnp.asarray(rng.standard_normal((2, 5, 2, 16)), jnp.float32)
  valid = jnp.asarray(rng.random((2, 5)) < 0.7)

  def run(mesh, context_axis):
    def f(q, k, v):
      return jsa.na2d(q, k, v, (3, 3), is_causal=(True, False), additional_keys=ek,
                      additional_values=ev, additional_valid=valid, backend="xla", mesh=mesh,
                      context_axis=context_axis)
    return jax.jit(lambda *a: _value_and_grads(f, *a))(q, k, v, d_out)

  want = run(None, None)
  _assert_close(run(_mesh(4), "context"), want, 1e-5, "context axis")
  _assert_close(run(jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO,) * 2), None),
                want, 1e-5, "batch/heads")


def test_na_padding_mask_on_a_mesh():
  q, k, v, d_out, rng = _inputs(12, (4, 6, 7, 4, 16), (4, 6, 7, 2, 16))
  valid = jnp.asarray(rng.random((4, 6, 7)) < 0.6)
  seg = jnp.asarray(rng.integers(0, 2, (4, 6, 7)), jnp.int32)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO,) * 2)

  def run(mesh):
    f = lambda q, k, v: jsa.na2d(q, k, v, 3, kv_valid=valid, segment_ids=seg, backend="xla",
                                 mesh=mesh)
    return jax.jit(lambda *a: _value_and_grads(f, *a))(q, k, v, d_out)

  _assert_close(run(mesh), run(None), 1e-5, "batch/heads")


@pytest.mark.parametrize("spatial, kernel, causal, strategy, context, with_seg", [
    ((8, 7), 3, False, "halo", 4, True),
    ((8, 7), (5, 3), (True, False), "halo", 4, False),
    pytest.param((16, 5), (7, 3), False, "halo", 8, True,  # a halo of 3 slices: two hops
                 marks=pytest.mark.extended),
    ((8, 4, 5), (3, 3, 3), (True, False, False), "allgather", 4, True),
])
def test_na_padding_mask_context_parallel(spatial, kernel, causal, strategy, context,
                                          with_seg, backend="xla", tol=1e-5, **kw):
  """kv_valid and segment ids with the leading dim sharded: the keys' ids travel with their
  halos. Rows whose whole neighborhood is padding are zero (not NaN) with zero gradients."""
  q, k, v, d_out, rng = _inputs(15, (2,) + spatial + (4, 16), (2,) + spatial + (2, 16))
  valid = rng.random((2,) + spatial) < 0.6
  valid[0, :spatial[0] // 2] = False  # whole padded slabs: queries that see nothing
  valid = jnp.asarray(valid)
  seg = jnp.asarray(rng.integers(0, 2, (2,) + spatial), jnp.int32) if with_seg else None

  def run(mesh, context_axis, backend, **kw):
    f = lambda q, k, v: jsa.na(q, k, v, kernel, is_causal=causal, kv_valid=valid,
                               segment_ids=seg, backend=backend, mesh=mesh,
                               context_axis=context_axis, strategy=strategy, **kw)
    return jax.jit(lambda *a: _value_and_grads(f, *a))(q, k, v, d_out)

  got = run(_mesh(context, other="model"), "context", backend, **kw)
  _assert_close(got, run(None, None, "reference"), tol, f"{spatial} {kernel} {strategy}")
  empty = np.asarray(jsa.na(q, k, v, kernel, is_causal=causal, kv_valid=valid,
                            segment_ids=seg, backend="reference", return_lse=True)[1]) == -np.inf
  assert empty.any()
  assert np.all(np.asarray(got[0])[empty] == 0) and np.all(np.asarray(got[1])[empty] == 0)


def test_na_padding_mask_context_parallel_triton_interpret():
  test_na_padding_mask_context_parallel((8, 8), (3, 5), (True, False), "halo", 4, True,
                                        backend="triton", tol=1e-4, interpret=True,
                                        block_q=16, block_kv=16)


@pytest.mark.parametrize("mask_name, strategy", [("causal", "ring"), ("causal_window", "halo"),
                                                 ("window_sink", "allgather")])
def test_soft_cap(mask_name, strategy):
  """`logits_soft_cap` on a mesh: each shard's kernels cap its scores, the log-sum-exp merge
  is unchanged; forward and gradients against one device (itself checked against the capped
  brute force in test_ops)."""
  _check_sequence(mask_name, strategy, "contiguous", context=4, chunk=16, heads=4, kv_heads=2,
                  segments=mask_name == "causal", seed=5, logits_soft_cap=0.7)


def test_na_soft_cap():
  """`logits_soft_cap` on a neighborhood sharded along time (halos) against the capped
  reference."""
  mesh = _mesh(4, other="model")
  spatial, args = (8, 6, 5), ((3, 3, 3), 1, 1, (True, False, False))
  q, k, v, d_out, _ = _inputs(2, (2,) + spatial + (4, 16), (2,) + spatial + (2, 16))
  run = lambda backend, **kw: (lambda q, k, v: jsa.na(q, k, v, *args, backend=backend,
                                                      logits_soft_cap=0.5, **kw))
  got = _value_and_grads(jax.jit(run("xla", mesh=mesh, context_axis="context",
                                     strategy="halo")), q, k, v, d_out)
  want = _value_and_grads(run("reference"), q, k, v, d_out)
  uncapped = jsa.na(q, k, v, *args, backend="reference")
  assert brute_force.rel_err(uncapped, want[0]) > 0.05  # the cap matters here
  _assert_close(got, want, 2e-5, "na soft cap")
