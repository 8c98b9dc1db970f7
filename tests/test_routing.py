"""Content-routed attention: block selection (`routing`), runtime block maps built on device
(`block_map.from_selection`) and `attention(..., block_selection=)` on the XLA and Triton
(interpret mode) backends vs the float64 brute force under the same selected blocks."""
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
from jax_sparse_attn import masks, routing
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan

KW = {"xla": {}, "triton": dict(interpret=True)}
MASKS = {
    "full": masks.full(),
    "causal": masks.causal(),
    "window": masks.sliding_window(20, 3),
    "function": masks.from_function(lambda q, k: (q + k) % 3 != 1),
}


def dense_selected(ids, sq, skv, bs):
  """[b, h, sq, skv]: pairs whose key block the query's block selects."""
  b, h, nq, _ = ids.shape
  out = np.zeros((b, h, sq, skv), bool)
  nk = -(-skv // bs)
  for bi, hi, qi in np.ndindex(b, h, nq):
    for j in ids[bi, hi, qi]:
      if 0 <= j < nk:
        out[bi, hi, qi * bs:(qi + 1) * bs, j * bs:(j + 1) * bs] = True
  return out


@st.composite
def routed_problems(draw):
  bs = draw(st.sampled_from([16, 32]))
  sq = draw(st.integers(1, 90))
  kv_heads = draw(st.sampled_from([1, 2]))
  return dict(batch=draw(st.integers(1, 2)), sq=sq, skv=sq, bs=bs, kv_heads=kv_heads,
              heads=kv_heads * draw(st.sampled_from([1, 2])), head_dim=16,
              mask=draw(st.sampled_from(sorted(MASKS))), k=draw(st.integers(1, 4)),
              segments=draw(st.booleans()), dtype=jnp.float32, seed=draw(st.integers(0, 2**16)))


def check_routed(p, backend, **kwargs):
  q, k, v, d_out, rng = backend_cases.make_inputs(p)
  b, h, sq, bs = p["batch"], p["heads"], p["sq"], p["bs"]
  nq = -(-sq // bs)
  # Random picks with repeats, -1 and out-of-range ids; some rows pick nothing.
  ids = rng.integers(-1, nq + 1, (b, h, nq, p["k"])).astype(np.int32)
  ids[rng.random((b, h, nq)) < 0.2] = -1
  sel = routing.BlockSelection(jnp.asarray(ids), bs)
  mask = MASKS[p["mask"]]
  dense = np.asarray(mask(np.arange(sq)[:, None], np.arange(sq)[None, :]))
  m = dense_selected(ids, sq, sq, bs) & dense[None, None]
  seg = None
  if p["segments"]:
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, sq)), axis=1), jnp.int32)
    m &= (np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :])
  scale = 1.0 / math.sqrt(p["head_dim"])
  want, want_lse = brute_force.attention(q, k, v, m, scale)
  run = lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg, block_selection=sel,
                                      backend=backend, return_lse=True, **kwargs)
  (out, lse), grads = backend_cases.outputs_and_grads(run, d_out, q, k, v)
  tol = backend_cases.TOL[p["dtype"]]
  assert brute_force.rel_err(out, want) < tol
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=tol * 10, rtol=tol)
  assert np.all(np.asarray(out)[~finite] == 0)
  want_grads = brute_force.attention_grads(q, k, v, m, scale, d_out)
  for name, got, ref in zip("qkv", grads, want_grads):
    err = brute_force.rel_err(got, ref)
    assert err < tol * 2 or backend_cases._small(got, ref, tol), (name, err)


@pytest.mark.parametrize("backend", sorted(KW))
@settings(max_examples=examples(3))
@given(p=routed_problems())
def test_routed_attention(backend, p):
  check_routed(p, backend, **KW[backend])


def test_routed_low_precision_triton():
  p = dict(batch=1, sq=96, skv=96, bs=32, kv_heads=1, heads=2, head_dim=32, mask="causal", k=2,
           segments=False, dtype=jnp.bfloat16, seed=9)
  check_routed(p, "triton", interpret=True)


@pytest.mark.parametrize("mask, kv_heads, backward, dq", [
    ("causal", 1, "mosaic_gpu", None), ("function", 1, "mosaic_gpu", None),
    ("window", 2, "mosaic_gpu", None), ("causal", 1, "triton", None),
    ("window", 2, "mosaic_gpu", "own"), ("causal", 2, "mosaic_gpu", "split")])
def test_routed_mosaic_gpu_interpret(mask, kv_heads, backward, dq):
  # The Hopper forward and the dQ kernel walk per-(batch, head) rows; with GQA each query head
  # of a group has its own Q list per KV block (the dK/dV kernel's device-built work items);
  # "own": dQ reduce-added by the dK/dV kernel; "split" (128 columns): the same with dQ's
  # columns split between the warpgroups, a step late (`attention_bwd.DEFERRED_DQ`), as MoBA
  # runs on the GPU. Two batch rows with GQA (per-batch rows), one otherwise (interpret-mode
  # time).
  from pallas_kernels.gpu import MosaicGPUConfig
  p = dict(batch=kv_heads, sq=300, skv=300, bs=128, kv_heads=kv_heads, heads=2,
           head_dim=128 if dq == "split" else 64,
           mask=mask, k=2, segments=mask == "causal", dtype=jnp.bfloat16, seed=4)
  check_routed(p, "mosaic_gpu", interpret=True,
               config=MosaicGPUConfig(backward=backward, backward_dq=dq))


@pytest.mark.parametrize("head_items, head_chunk, dq", [
    (False, "mean", None), (True, "mean", None), (True, "whole", None), (True, "mean", "own")])
def test_routed_mosaic_gpu_lists_in_chunks(monkeypatch, head_items, head_chunk, dq):
  """KV blocks whose Q lists are longer than a work item's chunk (1 here): several CTAs
  reduce-add their dK/dV; GQA heads of a group with different list lengths; items per query
  head (`work_items.HEAD_ITEMS`) or per group; dQ its own kernel or reduce-added by the dK/dV
  kernel ("own")."""
  from pallas_kernels.gpu import MosaicGPUConfig
  from pallas_kernels.gpu.mosaic_gpu import work_items
  monkeypatch.setattr(work_items, "chunk_entries", lambda mean: 1)
  monkeypatch.setattr(work_items, "HEAD_ITEMS", head_items)
  monkeypatch.setattr(work_items, "HEAD_CHUNK", head_chunk)  # "whole": one item per head
  p = dict(batch=1, sq=640, skv=640, bs=128, kv_heads=1, heads=2, head_dim=32, mask="causal",
           k=3, segments=False, dtype=jnp.bfloat16, seed=5)
  check_routed(p, "mosaic_gpu", interpret=True,
               config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq))


@pytest.mark.parametrize("kv_heads, dq, written", [
    (1, None, True), (2, "own", True), (1, "split", True),
    pytest.param(2, "own", False, marks=pytest.mark.extended)])
def test_routed_mosaic_gpu_whole_lists(monkeypatch, kv_heads, dq, written):
  """dK/dV items of whole lists (`RUNTIME_ITEMS="whole"`, stored in the input dtype): every
  query block selects every block before it but one (lists as long as the map allows, of
  different lengths per GQA head), KV blocks no query selects (zero gradients: zero-filled,
  or stored by their items with dK/dV the kernel's outputs, `WRITTEN_RUNTIME`); dQ as its
  own kernel and reduce-added by the dK/dV kernel (each warpgroup its own keys' share, or
  the 128 columns split, dQ a step late: `DEFERRED_DQ`, over a GQA head with an empty
  list); segment ids. The forms lower for CUDA."""
  from pallas_kernels.gpu import MosaicGPUConfig
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, work_items
  monkeypatch.setattr(work_items, "RUNTIME_ITEMS", "whole")
  monkeypatch.setattr(attention_bwd, "WRITTEN_RUNTIME", written)
  b, h, s, bs = kv_heads, 2, 400, 128
  p = dict(batch=b, sq=s, skv=s, heads=h, kv_heads=kv_heads,
           head_dim=128 if dq == "split" else 32, dtype=jnp.bfloat16, seed=7)
  q, k, v, d_out, rng = backend_cases.make_inputs(p)
  nq = -(-s // bs)
  ids = np.tile(np.arange(nq, dtype=np.int32), (b, h, nq, 1))
  ids[:, 1, :, 1] = -1  # head 1 never selects block 1
  ids[:, :, :, 3] = -1  # no head selects block 3: its item stores zeros (`WRITTEN_RUNTIME`)
  sel = routing.BlockSelection(jnp.asarray(ids), bs)
  seg = jnp.asarray(np.repeat([[0] * 250 + [1] * 150], b, axis=0), jnp.int32)
  m = (dense_selected(ids, s, s, bs) & np.tril(np.ones((s, s), bool))[None, None]
       & (np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :]))
  scale = 1 / math.sqrt(p["head_dim"])
  want, _ = brute_force.attention(q, k, v, m, scale)
  run = lambda q, k, v: jsa.attention(
      q, k, v, masks.causal(), segment_ids=seg, block_selection=sel, backend="mosaic_gpu",
      interpret=True, config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq))
  out, grads = backend_cases.outputs_and_grads(run, d_out, q, k, v)
  assert brute_force.rel_err(out, want) < 2e-2
  for name, got, ref in zip("qkv", grads, brute_force.attention_grads(q, k, v, m, scale, d_out)):
    assert brute_force.rel_err(got, ref) < 4e-2, name
  from pallas_kernels.gpu import export_for_gpu
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  lowered = lambda q, k, v: jax.grad(lambda *a: jnp.sum(jsa.attention(
      *a, masks.causal(), block_selection=sel, backend="mosaic_gpu",
      config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq)).astype(jnp.float32)),
      argnums=(0, 1, 2))(q, k, v)
  export_for_gpu(lowered, S(b, s, h, 128), S(b, s, kv_heads, 128), S(b, s, kv_heads, 128))


def test_whole_lists_rule():
  """`RUNTIME_ITEMS="auto"`: whole lists where the longest possible item is short against
  an SM's share (the MoBA row), chunks where one list could be most of it."""
  from jax_sparse_attn import block_map
  from jax_sparse_attn.layout import SequenceLayout
  from jax_sparse_attn.plan import make_plan
  from pallas_kernels.gpu.mosaic_gpu import work_items
  def rule(s, top_k, heads):
    static = make_plan(masks.causal(), SequenceLayout(s, 128), SequenceLayout(s, 128)).block_map
    ids = jax.ShapeDtypeStruct((1, heads, s // 128, top_k + 2), jnp.int32)
    # The rule reads the map's static sizes: trace the map, never build it.
    found = []
    jax.eval_shape(lambda ids: found.append(work_items.whole_lists(
        block_map.from_selection(ids, static), 1, heads, 1)), ids)
    return found[0]
  assert rule(32768, 32, 16)  # MoBA: 256 entries at most per item, ~1000 steps per SM
  assert not rule(4096, 8, 2)  # 32 entries, but only ~5 per SM


def test_runtime_work_items():
  """The Hopper backward's work items of a runtime map, built on device: every KV block's
  group-longest list in chunks, KV-block order, then no-work items (KV block = n_kv)."""
  from pallas_kernels.gpu.mosaic_gpu.work_items import runtime_items
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 30, (2, 4, 7))
  counts[0, :, 3] = 0
  items = np.asarray(runtime_items(jnp.asarray(counts), 2, 8, int(counts.sum(-1).max())))
  for b in range(2):
    for g in range(2):
      longest = counts[b, 2 * g:2 * g + 2].max(0)
      want = [(j, i) for j in range(7) for i in range(-(-longest[j] // 8))]
      assert [tuple(x) for x in items[b, g].tolist() if x[0] < 7] == want
      assert (items[b, g, len(want):] == [7, 0]).all()
  # `HEAD_ITEMS="auto"`: per query head where the group's Q and dO outgrow the L2 (MoBA's row
  # at GQA 16/4, S=32768), not at 8192 nor without GQA.
  from pallas_kernels.gpu.mosaic_gpu import work_items
  assert work_items.HEAD_ITEMS == "auto"
  assert work_items.head_items(4, 32768, 128, 2)
  assert not work_items.head_items(4, 8192, 128, 2) and not work_items.head_items(1, 32768, 128, 2)
  # Per query head: each head's own list in chunks, the group's heads one after another,
  # each head's no-work items after its real ones.
  items = np.asarray(runtime_items(jnp.asarray(counts), 2, 8, int(counts.sum(-1).max()),
                                   per_head=True))
  n = items.shape[2] // 2
  for b in range(2):
    for g in range(2):
      for j in range(2):
        own = counts[b, 2 * g + j]
        want = [(blk, i, j) for blk in range(7) for i in range(-(-own[blk] // 8))]
        part = items[b, g, j * n:(j + 1) * n]
        assert [tuple(x) for x in part.tolist()[:len(want)]] == want
        assert (part[len(want):, 0] == 7).all()


@pytest.mark.parametrize("mask, kv_heads", [("causal", 1), ("window", 2)])
def test_routed_tpu_interpret(mask, kv_heads):
  p = dict(batch=2, sq=300, skv=300, bs=128, kv_heads=kv_heads, heads=2, head_dim=32,
           mask=mask, k=2, segments=mask == "causal", dtype=jnp.float32, seed=6)
  check_routed(p, "mosaic", interpret=True)


def test_runtime_maps_lower_for_tpu():
  from pallas_kernels.tpu import export_for_tpu
  sds = jax.ShapeDtypeStruct
  b, s, h, hkv, d, bs = 1, 1024, 4, 2, 128, 128

  def f(q, k, v, ids):
    sel = routing.BlockSelection(ids, bs)
    loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), block_selection=sel,
                                                 backend="mosaic").astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  exported = export_for_tpu(f, sds((b, s, h, d), jnp.bfloat16), sds((b, s, hkv, d), jnp.bfloat16),
                            sds((b, s, hkv, d), jnp.bfloat16), sds((b, h, s // bs, 3), jnp.int32))
  assert exported.mlir_module().count("tpu_custom_call") >= 3  # fwd, dq, dk/dv


def test_runtime_map_matches_selection_and_static_classes():
  static = make_plan(masks.causal(), SequenceLayout(100, 16), SequenceLayout(100, 16)).block_map
  classes = static.dense_classes()
  rng = np.random.default_rng(3)
  ids = rng.integers(-2, 9, (2, 3, 7, 4)).astype(np.int32)
  bmap = jax.jit(lambda i: block_map_lib.from_selection(i, static))(jnp.asarray(ids))
  assert bmap.is_runtime and bmap.kv_ids.shape[:3] == (2, 3, 7)
  kv_ids, counts, full = (np.asarray(x) for x in (bmap.kv_ids, bmap.kv_counts,
                                                  bmap.kv_full_counts))
  q_ids, q_counts = np.asarray(bmap.q_ids), np.asarray(bmap.q_counts)
  for bi, hi, qi in np.ndindex(2, 3, 7):
    want = sorted({int(j) for j in ids[bi, hi, qi] if 0 <= j < 7 and classes[qi, j]})
    got = kv_ids[bi, hi, qi, :counts[bi, hi, qi]]
    n_full = full[bi, hi, qi]
    assert sorted(got) == want
    assert all(classes[qi, j] == block_map_lib.FULL for j in got[:n_full])
    assert all(classes[qi, j] == block_map_lib.PARTIAL for j in got[n_full:])
    for j in want:  # the transpose lists the same pairs
      assert qi in q_ids[bi, hi, j, :q_counts[bi, hi, j]]
  assert q_counts.sum() == counts.sum()


def test_select_rules():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.standard_normal((2, 3, 8, 8)), jnp.float32)
  sel = routing.select(scores, 16, 2, causal=True, local_blocks=2, sink_blocks=1)
  ids = np.asarray(sel.ids)
  assert ids.shape == (2, 3, 8, 5) and sel.block_size == 16
  s = np.asarray(scores)
  for bi, hi, qi in np.ndindex(2, 3, 8):
    row = [int(j) for j in ids[bi, hi, qi] if j >= 0]
    assert all(j <= qi for j in row)  # causal
    forced = {j for j in (qi, qi - 1, 0) if 0 <= j <= qi}
    assert forced <= set(row)
    rest = [j for j in range(qi + 1) if j not in forced]
    best = sorted(rest, key=lambda j: -s[bi, hi, qi, j])[:2]
    assert set(best) <= set(row)
    assert len(set(row)) == len(forced) + len(best)
  # top_fraction: at most ceil(f * visible) chosen per row (causal row i sees i + 1 blocks).
  sel = routing.select(scores, 16, 8, causal=True, top_fraction=0.25)
  chosen = (np.asarray(sel.ids) >= 0).sum(-1)
  np.testing.assert_array_equal(chosen, np.broadcast_to(np.ceil(0.25 * (np.arange(8) + 1)),
                                                        chosen.shape))
  for bi, hi, qi in np.ndindex(2, 3, 8):  # and they are the best ones
    row = sorted(int(j) for j in np.asarray(sel.ids)[bi, hi, qi] if j >= 0)
    assert row == sorted(np.argsort(-s[bi, hi, qi, :qi + 1])[:len(row)].tolist())
  with pytest.raises(ValueError, match="top_fraction must be"):
    routing.select(scores, 16, 2, top_fraction=1.5)
  # Non-causal, no forced blocks: exactly the top k.
  sel = routing.select(scores, 16, 3)
  np.testing.assert_array_equal(np.sort(np.asarray(sel.ids), -1),
                                np.sort(np.argsort(-s, -1)[..., :3], -1))


def test_topk_blocks_end_to_end_under_jit():
  # MoBA: pooled scores -> selection -> attention, in one jit; gradients flow to q, k, v.
  rng = np.random.default_rng(1)
  b, s, h, hkv, d = 1, 128, 4, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, hkv, hkv))

  def f(q, k, v):
    sel = routing.topk_blocks(q, k, 16, 2, causal=True, local_blocks=2)
    return jsa.attention(q, k, v, masks.causal(), block_selection=sel, backend="xla")

  out = jax.jit(f)(q, k, v)
  sel = routing.topk_blocks(q, k, 16, 2, causal=True, local_blocks=2)
  m = dense_selected(np.asarray(sel.ids), s, s, 16) & np.tril(np.ones((s, s), bool))
  want, _ = brute_force.attention(q, k, v, m, 0.25)
  assert brute_force.rel_err(out, want) < 1e-5
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  # Pooled scores: block means, GQA keys shared by the group.
  scores = np.asarray(routing.pooled_scores(q, k, 16))
  qp = np.asarray(q).reshape(b, 8, 16, h, d).mean(2)
  kp = np.repeat(np.asarray(k).reshape(b, 8, 16, hkv, d).mean(2), 2, axis=2)
  np.testing.assert_allclose(scores, np.einsum("bqhd,bkhd->bhqk", qp, kp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", sorted(KW))
def test_selection_shared_by_group(backend):
  """NSA's group-shared selection: ids with one row per KV head; query head j takes its KV
  head's row (j // group), as its keys. Scores are the group's mean (`shared_by_group`)."""
  rng = np.random.default_rng(5)
  b, s, h, hkv, d, bs = 2, 90, 4, 2, 16, 16
  q, k, v, do = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32)
                 for n in (h, hkv, hkv, h))
  scores = np.asarray(routing.pooled_scores(q, k, bs, shared_by_group=True))
  per_head = np.asarray(routing.pooled_scores(q, k, bs))
  assert scores.shape == (b, hkv, 6, 6)
  np.testing.assert_allclose(scores, per_head.reshape(b, hkv, 2, 6, 6).mean(2), rtol=1e-5,
                             atol=1e-5)
  sel = routing.topk_blocks(q, k, bs, 2, causal=True, local_blocks=1, shared_by_group=True)
  ids = np.asarray(sel.ids)
  assert ids.shape == (b, hkv, 6, 3) and not np.array_equal(ids[:, 0], ids[:, 1])
  m = dense_selected(np.repeat(ids, 2, axis=1), s, s, bs) & np.tril(np.ones((s, s), bool))
  want = brute_force.attention(q, k, v, m, 0.25)[0]
  run = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), block_selection=sel,
                                      backend=backend, **KW[backend])
  out, grads = backend_cases.outputs_and_grads(run, do, q, k, v)
  assert brute_force.rel_err(out, want) < 1e-5
  for got, ref in zip(grads, brute_force.attention_grads(q, k, v, m, 0.25, do)):
    assert brute_force.rel_err(got, ref) < 1e-4
  with pytest.raises(ValueError, match="one row per KV head"):
    jsa.attention(q, k, v, block_selection=routing.BlockSelection(sel.ids[:, :1], bs))


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_runtime_maps_lower_for_gpu(backend):
  from pallas_kernels.gpu import export_for_gpu
  sds = jax.ShapeDtypeStruct
  b, s, h, hkv, d, bs = 1, 1024, 4, 2, 64, 128

  from pallas_kernels.gpu import MosaicGPUConfig
  config = MosaicGPUConfig(backward="mosaic_gpu") if backend == "mosaic_gpu" else None

  def f(q, k, v, ids):
    sel = routing.BlockSelection(ids, bs)
    loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), block_selection=sel,
                                                 backend=backend, config=config
                                                 ).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  exported = export_for_gpu(f, sds((b, s, h, d), jnp.bfloat16), sds((b, s, hkv, d), jnp.bfloat16),
                            sds((b, s, hkv, d), jnp.bfloat16), sds((b, h, s // bs, 3), jnp.int32))
  text = exported.mlir_module()
  if backend == "triton":
    assert text.count("sparse_attention_fwd") >= 1
    assert text.count("sparse_attention_dkv") >= 1
  else:  # forward, then dK/dV and dQ in one launch: Mosaic GPU kernels, no Triton
    assert text.count("@mosaic_gpu_v2(") == 2
    assert "__gpu$xla.gpu.triton" not in text


Q = jnp.ones((1, 64, 2, 16))
SEL = routing.BlockSelection(jnp.zeros((1, 2, 4, 2), jnp.int32), 16)


@pytest.mark.parametrize("call, match", [
    (lambda: jsa.attention(Q, Q, Q, block_selection=jnp.zeros((1, 2, 4, 2), jnp.int32)),
     "must be a jax_sparse_attn.routing.BlockSelection"),
    (lambda: jsa.attention(Q, Q, Q, block_selection=routing.BlockSelection(
        jnp.zeros((1, 2, 3, 2), jnp.int32), 16)), r"\[batch, heads, num_q_blocks, k\]"),
    (lambda: jsa.attention(Q, Q, Q, block_selection=SEL, block_q=32), "block_q=32 differs"),
    (lambda: jsa.attention(Q, Q, Q, block_selection=SEL, backend="reference"),
     "runs on backends 'xla', 'triton', 'mosaic_gpu' and 'mosaic'"),
    (lambda: routing.select(jnp.zeros((1, 2, 4, 4)), 24, 1), "power of two"),
    (lambda: routing.select(jnp.zeros((1, 2, 4, 4)), 16, -1), "top_k must be"),
    (lambda: routing.select(jnp.zeros((2, 4, 4)), 16, 1), "scores must be"),
    (lambda: routing.select_mass(jnp.zeros((1, 2, 4, 4)), 16, 0.5, 2, temperature=0.0),
     "temperature must be positive"),
    (lambda: routing.tile_order((4, 8), (2,)), "one positive entry per dim"),
    (lambda: routing.tile_order((4, 8), (2, 3)), "power of two"),
    (lambda: routing.topk_blocks(Q, Q[:, :, :1, :8], 16, 1), "same head_dim"),
    (lambda: routing.topk_blocks(Q, jnp.concatenate([Q] * 3, axis=2), 16, 1),
     r"heads \(2\) must be a multiple of kv_heads \(6\)"),
])
def test_bad_input_raises_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_select_mass_keeps_the_fewest_blocks_reaching_the_threshold():
  rng = np.random.default_rng(5)
  scores = jnp.asarray(rng.standard_normal((1, 2, 6, 6)) * 3, jnp.float32)
  sel = routing.select_mass(scores, 16, 0.7, 4, causal=True, local_blocks=1)
  ids = np.asarray(sel.ids)
  s = np.asarray(scores)
  for hi, qi in np.ndindex(2, 6):
    visible = np.arange(qi + 1)
    p = np.exp(s[0, hi, qi, visible] - s[0, hi, qi, visible].max())
    p /= p.sum()
    order = [j for j in visible[np.argsort(-p)] if j != qi]  # the diagonal is forced
    mass, want = 0.0, []
    for j in order[:4]:
      if mass >= 0.7:
        break
      want.append(int(j))
      mass += p[j]
    got = sorted(int(j) for j in ids[0, hi, qi] if j >= 0)
    assert got == sorted(want + [qi]), (hi, qi, got, want)
  with pytest.raises(ValueError, match="threshold must be"):
    routing.select_mass(scores, 16, 0.0, 4)


def test_video_blocks_route_in_tile_order():
  # VMoBA on a 3-D latent: blocks are 2x4x4 tiles; route and attend in tile order.
  rng = np.random.default_rng(2)
  spatial, tile, b, h, d = (4, 8, 6), (2, 4, 4), 1, 2, 16
  t = routing.tile_order(spatial, tile)
  x = lambda: jnp.asarray(rng.standard_normal((b, *spatial, h, d)), jnp.float32)
  q, k, v = x(), x(), x()
  valid = routing.tile_valid(t)
  seg = jnp.broadcast_to(jnp.where(valid, 0, 1), (b, t.padded_len)).astype(jnp.int32)

  def route_and_attend(q, k, v, seg):
    qt, kt, vt = t.to_kernel(q), t.to_kernel(k), t.to_kernel(v)
    sel = routing.topk_blocks(qt, kt, 32, 2, local_blocks=1)
    return sel, t.from_kernel(jsa.attention(qt, kt, vt, block_selection=sel, segment_ids=seg,
                                            backend="xla"))

  sel, out = compiled.run(route_and_attend, q, k, v, seg)
  assert out.shape == q.shape
  # The same pairs in the caller's order: brute force over real tokens only.
  rows = t.rows()
  blocks = np.zeros((b, h, t.padded_len, t.padded_len), bool)
  ids = np.asarray(sel.ids)
  for hi, qi in np.ndindex(h, t.padded_len // 32):
    for j in ids[0, hi, qi]:
      if j >= 0:
        blocks[0, hi, qi * 32:(qi + 1) * 32, j * 32:(j + 1) * 32] = True
  real = rows >= 0
  order = np.argsort(rows[real])
  m = blocks[:, :, real][:, :, :, real][:, :, order][:, :, :, order]
  flat = lambda z: np.asarray(z).reshape(b, -1, h, d)
  want, _ = brute_force.attention(flat(q), flat(k), flat(v), m, 0.25)
  assert brute_force.rel_err(flat(out), want) < 1e-5


def test_routed_attention_on_a_mesh():
  """Batch and heads sharded (the selection with them): forward and gradients equal the
  unsharded op, no all-gather in the compiled program, the output keeps q's sharding."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
  rng = np.random.default_rng(3)
  b, s, h, hkv, d, bs = 2, 96, 8, 4, 16, 32
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((b, s, h, d), (b, s, hkv, d), (b, s, hkv, d)))
  ids = jnp.asarray(rng.integers(-1, 3, (b, h, s // bs, 2)), jnp.int32)
  seg = jnp.asarray(np.repeat([[0, 1]], b, 0).repeat(s // 2, 1), jnp.int32)
  run = lambda q, k, v, ids, mesh: jsa.attention(
      q, k, v, masks.causal(), segment_ids=seg, block_selection=routing.BlockSelection(ids, bs),
      backend="xla", mesh=mesh)
  spec = NamedSharding(mesh, P("data", None, "model", None))
  qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
  ids_s = jax.device_put(ids, NamedSharding(mesh, P("data", "model")))
  sharded = jax.jit(lambda *a: run(*a, mesh))
  out = sharded(qs, ks, vs, ids_s)
  want = compiled.run(lambda *a: run(*a, None), q, k, v, ids)
  assert brute_force.rel_err(out, want) < 1e-6
  assert out.sharding.spec == P("data", None, "model", None)
  assert "all-gather" not in sharded.lower(qs, ks, vs, ids_s).compile().as_text()
  loss = lambda mesh: (lambda q, k, v: jnp.sum(run(q, k, v, ids, mesh) ** 2))
  got = jax.jit(jax.grad(loss(mesh), argnums=(0, 1, 2)))(qs, ks, vs)
  for g, w in zip(got, compiled.run(jax.grad(loss(None), argnums=(0, 1, 2)), q, k, v)):
    assert brute_force.rel_err(g, w) < 1e-5
  # A selection shared by each GQA group (one row per KV head) shards with the KV heads.
  shared = ids[:, ::2]
  shared_s = jax.device_put(shared, NamedSharding(mesh, P("data", "model")))
  out = sharded(qs, ks, vs, shared_s)
  want = compiled.run(lambda *a: run(*a, None), q, k, v, jnp.repeat(shared, 2, axis=1))
  assert brute_force.rel_err(out, want) < 1e-6
  assert "all-gather" not in sharded.lower(qs, ks, vs, shared_s).compile().as_text()


def _context_mesh(context):
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((8 // context, context), ("data", "context"), axis_types=auto)


@settings(max_examples=examples(3))
@given(p=routed_problems(), context=st.sampled_from([2, 4, 8]), blocks=st.integers(1, 2))
def test_routed_context_parallel(p, context, blocks):
  """The sequence sharded over a context axis (each device: its Q blocks' selection rows
  against all-gathered K/V), against the brute force under the same selected blocks."""
  p = dict(p, sq=context * blocks * p["bs"], batch=2)
  p["skv"] = p["sq"]
  check_routed(p, "xla", mesh=_context_mesh(context), context_axis="context")


@pytest.mark.parametrize("context, local_blocks, sink_blocks", [
    (2, 2, 1), pytest.param(4, 1, 0, marks=pytest.mark.extended)])
def test_routed_zigzag(context, local_blocks, sink_blocks):
  """Inputs in the zigzag order (a model whose causal layers want it): the selection made
  on zigzag-ordered q and k (`zigzag_shards`) is the sequence-order selection with its rows
  permuted, and the sharded attention equals one device's in sequence order, forward and
  gradients."""
  from jax_sparse_attn import context_parallel as cp
  rng = np.random.default_rng(9)
  b, s, h, hkv, d, bs = 2, 256, 4, 2, 16, 16
  q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                    ((b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)))
  seg = jnp.asarray(np.repeat([[0, 1, 2]], b, 0).repeat([100, 60, 96], 1), jnp.int32)
  rule = dict(causal=True, local_blocks=local_blocks, sink_blocks=sink_blocks)
  z = lambda x: cp.to_zigzag(x, context)
  natural = compiled.run(lambda q, k: routing.topk_blocks(q, k, bs, 3, **rule), q, k)
  zigzag = compiled.run(lambda q, k: routing.topk_blocks(q, k, bs, 3, zigzag_shards=context,
                                                         **rule), z(q), z(k))
  perm = cp.zigzag_permutation(s // bs, context)
  np.testing.assert_array_equal(np.asarray(zigzag.ids), np.asarray(natural.ids)[:, :, perm])
  mesh = _context_mesh(context)

  def f(q, k, v, seg, ids, mesh, layout):
    return jsa.attention(q, k, v, masks.causal(), segment_ids=seg,
                         block_selection=routing.BlockSelection(ids, bs), backend="xla",
                         mesh=mesh, context_axis="context" if mesh else None,
                         context_layout=layout)

  def run(mesh, layout, q, k, v, seg, ids, d):
    out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg, ids, mesh, layout), q, k, v)
    return (out,) + vjp(d)

  got = jax.jit(lambda *a: run(mesh, "zigzag", *a))(z(q), z(k), z(v), z(seg), zigzag.ids,
                                                    z(d_out))
  want = compiled.run(lambda *a: run(None, "contiguous", *a), q, k, v, seg, natural.ids,
                      d_out)
  for g, w in zip(got, want):
    assert brute_force.rel_err(cp.from_zigzag(g, context), w) < 1e-5


def test_routed_context_parallel_with_heads_sharded():
  # data x model x context: the selection's rows shard over batch, heads and query blocks.
  mesh = jax.make_mesh((2, 2, 2), ("data", "model", "context"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  p = dict(batch=2, sq=128, skv=128, bs=16, kv_heads=2, heads=4, head_dim=16, mask="window",
           k=3, segments=True, dtype=jnp.float32, seed=10)
  check_routed(p, "xla", mesh=mesh, context_axis="context")


def test_routed_context_parallel_triton_interpret():
  p = dict(batch=2, sq=128, skv=128, bs=16, kv_heads=1, heads=2, head_dim=16, mask="causal",
           k=3, segments=True, dtype=jnp.float32, seed=4)
  check_routed(p, "triton", interpret=True, mesh=_context_mesh(4), context_axis="context")


def test_routed_shard_plan_mosaic_gpu_interpret():
  """The Hopper kernels on a context-parallel device's local problem (its Q shard, at a
  global offset, against all K/V; the Mosaic GPU interpreter does not run on 8 host devices
  at once): the second of two shards, causal, with GQA, forward and gradients."""
  from jax_sparse_attn import context_parallel as cp, ops
  from pallas_kernels.gpu import MosaicGPUConfig
  p = dict(batch=1, sq=512, skv=512, bs=128, kv_heads=1, heads=2, head_dim=64, mask="causal",
           k=2, segments=False, dtype=jnp.bfloat16, seed=7)
  q, k, v, d_out, rng = backend_cases.make_inputs(p)
  ids = rng.integers(-1, 4, (1, 2, 4, 2)).astype(np.int32)
  plan = cp.plan_routed(masks.causal(), 512, 512, 2, 128)
  local = plan.plans[int(plan.table[0, 1])]
  assert local.q_layout.token_index()[0][0] == 256
  m = (dense_selected(ids, 512, 512, 128) & np.tril(np.ones((512, 512), bool)))[:, :, 256:]
  run = lambda q, k, v: ops._run_routed(
      "mosaic_gpu", local, 0.125, MosaicGPUConfig(backward="mosaic_gpu"), True, q, k, v, None,
      None, jnp.asarray(ids[:, :, 2:]))[0]
  q_s, d_s = q[:, 256:], d_out[:, 256:]
  out, grads = backend_cases.outputs_and_grads(run, d_s, q_s, k, v)
  want, _ = brute_force.attention(q_s, k, v, m, 0.125)
  assert brute_force.rel_err(out, want) < backend_cases.TOL[jnp.bfloat16]
  for name, got, ref in zip("qkv", grads, brute_force.attention_grads(q_s, k, v, m, 0.125,
                                                                        d_s)):
    assert brute_force.rel_err(got, ref) < 2 * backend_cases.TOL[jnp.bfloat16], name


def test_routed_context_parallel_tpu_interpret():
  # Two devices (as the TPU ring test in test_context_parallel: the TPU interpreter's
  # all-device barrier), each running its query blocks' rows against the gathered K/V.
  two = jax.make_mesh((2,), ("context",), axis_types=(jax.sharding.AxisType.Auto,),
                      devices=jax.devices()[:2])
  p = dict(batch=1, sq=512, skv=512, bs=128, kv_heads=1, heads=2, head_dim=32, mask="causal",
           k=2, segments=True, dtype=jnp.float32, seed=8)
  check_routed(p, "mosaic", interpret=True, mesh=two, context_axis="context")


def test_moba_selection_and_attention_with_the_sequence_sharded():
  """MoBA end to end in one jit on inputs sharded over the sequence: the pooled scores and
  top-k partition with them (XLA), the attention runs context-parallel; the same result and
  gradients as one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = _context_mesh(4)
  rng = np.random.default_rng(5)
  b, s, h, hkv, d, bs = 2, 256, 4, 2, 16, 16
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((b, s, h, d), (b, s, hkv, d), (b, s, hkv, d)))

  def f(q, k, v, mesh):
    sel = routing.topk_blocks(q, k, bs, 3, causal=True, local_blocks=1, sink_blocks=1)
    return jsa.attention(q, k, v, masks.causal(), block_selection=sel, backend="xla",
                         mesh=mesh, context_axis="context")

  spec = NamedSharding(mesh, P("data", "context"))
  qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
  loss = lambda mesh: (lambda q, k, v: jnp.sum(f(q, k, v, mesh) ** 2))
  out = jax.jit(lambda *a: f(*a, mesh))(qs, ks, vs)
  assert brute_force.rel_err(out, compiled.run(lambda *a: f(*a, None), q, k, v)) < 1e-5
  assert out.sharding.spec == P("data", "context")
  got = jax.jit(jax.grad(loss(mesh), argnums=(0, 1, 2)))(qs, ks, vs)
  for g, w in zip(got, compiled.run(jax.grad(loss(None), argnums=(0, 1, 2)), q, k, v)):
    assert brute_force.rel_err(g, w) < 1e-5


def test_routed_context_parallel_bad_input():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 128, 2, 16)), jnp.float32)
  sel = routing.BlockSelection(jnp.zeros((2, 2, 4, 1), jnp.int32), 32)
  mesh = _context_mesh(8)
  run = lambda **kw: jsa.attention(x, x, x, masks.causal(), block_selection=sel, mesh=mesh,
                                   context_axis="context", backend="xla", **kw)
  with pytest.raises(ValueError, match=r"seq_q=128 must be divisible by 8 x block_size "
                                       r"\(32\): each device holds whole blocks"):
    run()
  mesh = _context_mesh(4)
  with pytest.raises(ValueError, match="strategy='allgather'"):
    run(strategy="ring")
  with pytest.raises(ValueError, match=r"divisible by 8 x block_size \(32\): each zigzag "
                                       "chunk"):
    run(context_layout="zigzag")
  with pytest.raises(ValueError, match="zigzag_shards=3: the zigzag layout's 2 x 3 chunks"):
    routing.topk_blocks(x, x, 16, 2, causal=True, zigzag_shards=3)


def test_routed_tpu_long_maps_in_chunks(monkeypatch):
  """Runtime maps (rows per batch and head) split over blocks when they exceed the scalar
  memory budget: two batch rows x 2 heads x (2 entries + 2) x 4 bytes = 64 bytes per block."""
  from pallas_kernels.tpu import mosaic_attention
  monkeypatch.setattr(mosaic_attention, "_SMEM_MAP_BUDGET", 130)
  p = dict(batch=2, sq=300, skv=300, bs=128, kv_heads=1, heads=2, head_dim=32, mask="causal",
           k=2, segments=True, dtype=jnp.float32, seed=8)
  check_routed(p, "mosaic", interpret=True)
