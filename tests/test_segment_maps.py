"""Packed documents as runtime block maps (`block_map.from_segments`): block pairs of different
documents are skipped, full blocks inside one document run without the segment test. The
classes against element-level brute force (host, randomized), and every kernel backend
(interpret mode) against the float64 brute force on documents laid out so that the map has
dropped, full and partial blocks, forward and gradients; routing with documents."""
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
from jax_sparse_attn import block_map as block_map_lib
from jax_sparse_attn import masks, ops, routing
from jax_sparse_attn.block_map import EMPTY, FULL
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan


def documents(cuts_per_row, length):
  """Segment ids [batch, length]: document i starts at the i-th cut of its row."""
  pos = np.arange(length)
  return jnp.asarray(np.stack([(pos[:, None] >= np.asarray(c, int)[None, :]).sum(-1)
                               if len(c) else np.zeros(length, int) for c in cuts_per_row]),
                     jnp.int32)


@settings(max_examples=examples(12), deadline=None)
@given(sq=st.integers(1, 90), skv=st.integers(1, 90), bq=st.sampled_from([8, 16]),
       bk=st.sampled_from([8, 16, 32]),
       mask=st.sampled_from(sorted(backend_cases.SEQ_MASKS)), ordered=st.booleans(),
       seed=st.integers(0, 2**16))
def test_segment_classes_match_elements(sq, skv, bq, bk, mask, ordered, seed):
  """No block with an attending pair is dropped; FULL blocks attend on every pair (so the
  kernels may skip the segment test); with documents (ids ascending, each id one run) a
  block pair is visited exactly when the static map visits it and some ids are equal."""
  rng = np.random.default_rng(seed)
  b = 2
  if ordered:
    q_seg = np.cumsum(rng.random((b, sq)) < 0.08, axis=1)
    kv_seg = np.cumsum(rng.random((b, skv)) < 0.08, axis=1) if sq != skv else q_seg
  else:
    q_seg, kv_seg = rng.integers(0, 3, (b, sq)), rng.integers(0, 3, (b, skv))
  spec = backend_cases.seq_mask(mask, sq, skv)
  static = make_plan(spec, SequenceLayout(sq, bq), SequenceLayout(skv, bk)).block_map
  cls = np.asarray(compiled.run(lambda q, kv: block_map_lib.segment_classes(q, kv, static),
                                jnp.asarray(q_seg), jnp.asarray(kv_seg)))[:, 0]
  dense = np.asarray(spec(np.arange(sq)[:, None], np.arange(skv)[None, :]))
  static_cls = static.dense_classes()
  for bi in range(b):
    same = q_seg[bi][:, None] == kv_seg[bi][None, :]
    attend = dense & same
    for i, j in np.ndindex(static.num_q_blocks, static.num_kv_blocks):
      rows, cols = slice(i * bq, (i + 1) * bq), slice(j * bk, (j + 1) * bk)
      c = cls[bi, i, j]
      if attend[rows, cols].any():
        assert c != EMPTY, (bi, i, j)
      if c == FULL:
        assert attend[rows, cols].all() and (j + 1) * bk <= skv, (bi, i, j)
      assert c <= static_cls[i, j]
      if ordered:
        assert (c != EMPTY) == (static_cls[i, j] != EMPTY and same[rows, cols].any()), (bi, i, j)


def test_from_segments_rows():
  """The runtime map: one row per batch element, shared by the heads, as the classes say."""
  seg = documents([[200], [300, 340]], 512)
  static = make_plan(masks.full(), SequenceLayout(512, 128), SequenceLayout(512, 128)).block_map
  bmap = jax.jit(lambda s: block_map_lib.from_segments(s, s, static))(seg)
  assert bmap.is_runtime and bmap.shares_heads and bmap.segments_full
  assert bmap.kv_ids.shape[:3] == (2, 1, 4)
  cls = np.asarray(block_map_lib.segment_classes(seg, seg, static))[:, 0]
  np.testing.assert_array_equal(np.asarray(bmap.kv_counts)[:, 0], (cls != EMPTY).sum(-1))
  np.testing.assert_array_equal(np.asarray(bmap.kv_full_counts)[:, 0], (cls == FULL).sum(-1))
  np.testing.assert_array_equal(np.asarray(bmap.q_counts)[:, 0], (cls != EMPTY).sum(-2))
  # Row 0: documents [0, 200) and [200, 512): blocks 2 and 3 never meet block 0.
  assert cls[0, 0].tolist() == [FULL, 1, EMPTY, EMPTY] and cls[0, 3].tolist() == [
      EMPTY, 1, FULL, FULL]


# Two rows of documents over 512 tokens: blocks (of 128 or 64) that meet nothing, blocks in
# one document (full under the dense and window masks), blocks across a boundary.
CUTS = [[200], [130, 300]]
CASES = {
    "full": masks.full(),
    "window_sink": masks.causal() & (masks.sliding_window(300) | masks.sink(4)),
    "masked_rows": masks.causal(offset=-5),
}
BACKENDS = {
    "triton": dict(interpret=True),
    "mosaic_gpu": dict(interpret=True),
    "mosaic": dict(interpret=True),
    "xla": {},
}


def _check(q, k, v, d_out, mask, q_seg, kv_seg, backend, **kwargs):
  sq, skv = q.shape[1], k.shape[1]
  scale = 1 / math.sqrt(q.shape[-1])
  dense = np.asarray(mask(np.arange(sq)[:, None], np.arange(skv)[None, :]))

  def run(q, k, v):
    return jsa.attention(q, k, v, mask, segment_ids=(q_seg, kv_seg), backend=backend,
                         return_lse=True, **kwargs)

  (out, lse), grads = backend_cases.outputs_and_grads(run, d_out, q, k, v)
  want, want_lse = brute_force.attention(q, k, v, dense, scale, q_seg, kv_seg)
  tol = {jnp.dtype(t): x for t, x in backend_cases.TOL.items()}[q.dtype]
  assert brute_force.rel_err(out, want) < tol
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=tol * 10, rtol=tol)
  assert np.all(np.asarray(out, np.float32)[~finite] == 0)
  want_grads = brute_force.attention_grads(q, k, v, dense, scale, d_out, q_seg, kv_seg)
  for name, got, ref in zip("qkv", grads, want_grads):
    assert np.all(np.isfinite(np.asarray(got, np.float32))), name
    assert brute_force.rel_err(got, ref) < 2 * tol, (name, brute_force.rel_err(got, ref))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mask", sorted(CASES))
def test_documents(backend, mask):
  """Forward, lse and gradients with documents (GQA 2/1, bf16 on the GPU kernels); the map
  the GPU backends build drops blocks and has full ones (so the test covers the skipped
  test; the TPU kernels too); XLA keeps the static map and tests ids on every block."""
  if mask == "masked_rows" and backend != "xla" or backend == "mosaic_gpu" and mask == "full":
    pytest.skip("covered by the other cases (rows that see nothing: xla here and each "
                "kernel's own tests; full blocks: window_sink); interpret-mode time")
  dtype = jnp.float32 if backend in ("xla", "mosaic") else jnp.bfloat16
  p = dict(batch=2, sq=512, skv=512, heads=2, kv_heads=1, head_dim=64, dtype=dtype, seed=5)
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  seg = documents(CUTS, 512)
  spec = CASES[mask]
  static = make_plan(spec, SequenceLayout(512, 128), SequenceLayout(512, 128)).block_map
  cls = np.asarray(block_map_lib.segment_classes(seg, seg, static))
  assert (cls == EMPTY).sum() > (static.dense_classes() == EMPTY).sum() * 2
  if mask != "masked_rows":
    assert (cls == FULL).any()
  _check(q, k, v, d_out, spec, seg, seg, backend, **BACKENDS[backend])


def test_documents_cross_attention_and_unordered_ids():
  """Separate q / kv ids and lengths, ids in no order (the map is then a superset)."""
  rng = np.random.default_rng(3)
  p = dict(batch=2, sq=200, skv=333, heads=2, kv_heads=1, head_dim=32, dtype=jnp.float32,
           seed=9)
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  q_seg = documents([[90], [10, 150]], 200)
  kv_seg = jnp.asarray(rng.integers(0, 3, (2, 333)), jnp.int32)
  _check(q, k, v, d_out, masks.full(), q_seg, kv_seg, "triton", interpret=True)
  kv_seg = documents([[120], [20, 250]], 333)
  _check(q, k, v, d_out, masks.causal(offset=133), q_seg, kv_seg, "triton", interpret=True)


def test_segment_ids_bad_shapes():
  """Ids of the wrong rank, dtype, length or batch are ValueErrors naming the argument."""
  static = make_plan(masks.causal(), SequenceLayout(256, 64), SequenceLayout(200, 64)).block_map
  ok_q, ok_kv = jnp.zeros((2, 256), jnp.int32), jnp.zeros((2, 200), jnp.int32)
  for q_seg, kv_seg, match in [
      (jnp.zeros((256,), jnp.int32), ok_kv, "q_seg must be an integer"),
      (ok_q, jnp.zeros((2, 200), jnp.float32), "kv_seg must be an integer"),
      (jnp.zeros((2, 300), jnp.int32), ok_kv, "q_seg has 300 positions"),
      (ok_q, jnp.zeros((2, 257), jnp.int32), "kv_seg has 257 positions"),
      (ok_q, jnp.zeros((3, 200), jnp.int32), "same batch")]:
    with pytest.raises(ValueError, match=match):
      block_map_lib.from_segments(q_seg, kv_seg, static)
  assert block_map_lib.segment_classes(ok_q, ok_kv, static).shape == (2, 1, 4, 4)


def test_documents_cross_attention_mosaic_gpu():
  """The Hopper backward walks a documents' map with the static map's work items: KV blocks
  whose ids meet no query (batch 0's second block) get zero dK/dV, others their clipped
  lists; q and kv lengths differ."""
  p = dict(batch=2, sq=512, skv=384, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
           seed=5)
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  q_seg = documents([[200], [130, 300]], 512)
  kv_seg = jnp.asarray([[0] * 128 + [7] * 128 + [1] * 128, [0] * 100 + [1] * 150 + [2] * 134],
                       jnp.int32)
  _check(q, k, v, d_out, masks.full(), q_seg, kv_seg, "mosaic_gpu", interpret=True)


def test_budget_falls_back_to_the_static_map(monkeypatch):
  """Past the map budget (or with the switch off) segment ids are tested on every block of
  the static map: the same numbers."""
  p = dict(batch=1, sq=256, skv=256, heads=2, kv_heads=2, head_dim=32, dtype=jnp.float32,
           seed=2)
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  seg = documents([[100]], 256)
  plan = make_plan(masks.causal(), SequenceLayout(256, 64), SequenceLayout(256, 64))
  assert ops._segment_map("triton", plan, seg, seg) is not None
  assert ops._segment_map("xla", plan, seg, seg) is None
  monkeypatch.setattr(ops, "_SEGMENT_MAP_BUDGET", 4)
  assert ops._segment_map("triton", plan, seg, seg) is None
  _check(q, k, v, d_out, masks.causal(), seg, seg, "triton", interpret=True)


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_routing_with_documents(backend):
  """A block selection and documents together: attention is restricted to both."""
  p = dict(batch=2, sq=512, skv=512, heads=2, kv_heads=2, head_dim=64, dtype=jnp.bfloat16,
           seed=4)
  q, k, v, d_out, rng = backend_cases.make_inputs(p)
  seg = documents(CUTS, 512)
  ids = rng.integers(-1, 4, (2, 2, 4, 2)).astype(np.int32)
  sel = routing.BlockSelection(jnp.asarray(ids), 128)
  chosen = np.zeros((2, 2, 512, 512), bool)
  for bi, hi, qi in np.ndindex(2, 2, 4):
    for j in ids[bi, hi, qi]:
      if j >= 0:
        chosen[bi, hi, qi * 128:(qi + 1) * 128, j * 128:(j + 1) * 128] = True
  mask = masks.causal()
  dense = np.asarray(mask(np.arange(512)[:, None], np.arange(512)[None, :]))[None, None] & chosen
  run = lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg, backend=backend,
                                      interpret=True, block_selection=sel)
  out, grads = backend_cases.outputs_and_grads(run, d_out, q, k, v)
  want, _ = brute_force.attention(q, k, v, dense, 1 / 8, seg, seg)
  assert brute_force.rel_err(out, want) < 2e-2
  want_grads = brute_force.attention_grads(q, k, v, dense, 1 / 8, d_out, seg, seg)
  for name, got, ref in zip("qkv", grads, want_grads):
    assert brute_force.rel_err(got, ref) < 4e-2, name


@pytest.mark.parametrize("backend, kwargs", [("xla", {}), ("triton", dict(interpret=True))])
def test_numpy_segment_ids_inside_jit(backend, kwargs):
  """Segment ids given as NumPy arrays (constants of the jitted function) work like jax ones."""
  p = dict(batch=2, sq=96, skv=96, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32, seed=6)
  q, k, v, _, _ = backend_cases.make_inputs(p)
  seg = np.asarray(documents([[40], [10, 70]], 96))
  run = lambda s: jax.jit(lambda q, k, v: jsa.attention(q, k, v, masks.causal(), segment_ids=s,
                                                        backend=backend, **kwargs))(q, k, v)
  np.testing.assert_allclose(np.asarray(run(seg)), np.asarray(run(jnp.asarray(seg))), atol=1e-6)


@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
def test_documents_lower_for_gpu(backend):
  """The maps rows shared by the heads, forward and backward (GQA), lowered for CUDA on CPU."""
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(jsa.attention(q, k, v, masks.causal(), segment_ids=s,
                                                  backend=backend).astype(jnp.float32))
  from pallas_kernels.gpu import export_for_gpu
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(2, 1000, 8, 64), S(2, 1000, 2, 64),
                        S(2, 1000, 2, 64), seg).mlir_module()
  kind = "@mosaic_gpu_v2(" if backend == "mosaic_gpu" else "__gpu$xla.gpu.triton"
  # Mosaic GPU: the forward, then dQ's CTAs in the dK/dV launch (`attention_bwd.JOINT_DQ`)
  assert text.count(kind) >= (2 if backend == "mosaic_gpu" else 3)


def test_documents_lower_for_tpu():
  """The shared-rows map on the TPU kernels (scalar-prefetched), forward and backward, lowered
  for TPU on CPU."""
  from pallas_kernels.tpu import export_for_tpu
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(jsa.attention(q, k, v, masks.causal(), segment_ids=s,
                                                  backend="mosaic").astype(jnp.float32))
  text = export_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), S(2, 1024, 4, 128),
                        S(2, 1024, 2, 128), S(2, 1024, 2, 128), seg).mlir_module()
  assert text.count("tpu_custom_call") >= 3
