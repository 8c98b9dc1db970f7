"""The Hopper backward's work plan in GPU interpret mode (CPU) and CUDA lowering: work items
(lists cut at outliers, mixed and written dK/dV stores, the grid orders), dead 64x64 quarters
(`tables.live_quarters` against the dense mask; both kernels' skips), the backward's tiles by
live quarters, the dQ forms (fused or its own kernel, one launch with dK/dV) and the fused
form's Pᵀ from shared memory; gradients against the float64 brute force. The masks
themselves: test_mosaic_gpu_backward."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import backend_cases
import brute_force
from strategies import examples, gna_problems
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import MosaicGPUConfig, export_for_gpu
from pallas_kernels.gpu import mosaic_gpu as mgpu

BWD = MosaicGPUConfig(backward="mosaic_gpu")


def test_quarter_tiles(monkeypatch):
  """The backward's tiles by live 64x64 quarters (`cost.backward_tile_shapes`,
  `QUARTER_TILES`): 2-D 128² k33 takes (16, 8) tiles (the same 1920 blocks, 6400 live
  quarters instead of 6912), the simulator's with `QUARTER_TILES` off. Tilings that keep the
  MMA bias come first (`BIAS_BLOCKS_SLACK`), ties to square 64-row halves: 128² k17
  dilation 4 takes (16, 8) tiles, not (4, 32) (no bias) as by the quarters alone. On 24×24 k5 the pick, ((8, 16), (16, 8)),
  is no TMA box where the forward's tiles are: the backward's own gathered plan, whose
  gradients match the brute force."""
  from jax_sparse_attn import ops
  from jax_sparse_attn.simulate import best_tile_shapes, visited_blocks
  from pallas_kernels.gpu import mma_masks
  from pallas_kernels.gpu.mosaic_gpu import cost
  assert cost.QUARTER_TILES and cost.BIAS_BLOCKS_SLACK  # on by default (docs/performance.md)
  k33 = masks.neighborhood((128, 128), 33)
  assert cost.backward_tile_shapes(k33, 128, 128) == ((16, 8), (16, 8))
  assert cost._live_quarter_count(k33, (16, 8), (16, 8)) == 6400
  assert cost._live_quarter_count(k33, (8, 16), (8, 16)) == 6912
  biased = lambda tiles: all(mma_masks.bias_fits(t, 128) for t in tiles)
  for spatial, kernel, dil in [((32, 40), 11, 1), ((56, 56), 7, 1), ((96, 96), 17, 1),
                               ((40, 24), 9, 1), ((128, 128), 17, 4), ((40, 40), 7, 2)]:
    mask = masks.neighborhood(spatial, kernel, dilation=dil)
    base, pick = best_tile_shapes(mask, 128, 128), cost.backward_tile_shapes(mask, 128, 128)
    blocks = lambda t: visited_blocks(mask, *t)[0]
    if biased(pick) and not biased(base):
      assert blocks(pick) <= cost.BIAS_BLOCKS_SLACK * blocks(base)
    else:
      assert biased(pick) == biased(base) and blocks(pick) <= blocks(base)
      assert cost._live_quarter_count(mask, *pick) <= cost._live_quarter_count(mask, *base)
  k17 = masks.neighborhood((128, 128), 17, dilation=4)
  assert cost.backward_tile_shapes(k17, 128, 128) == ((16, 8), (16, 8))  # square halves
  monkeypatch.setattr(cost, "BIAS_BLOCKS_SLACK", 0)
  assert cost.backward_tile_shapes(k17, 128, 128) == ((4, 32), (4, 32))
  monkeypatch.setattr(cost, "QUARTER_TILES", False)
  assert cost.backward_tile_shapes(k33, 128, 128) == best_tile_shapes(k33, 128, 128)
  monkeypatch.undo()
  plans = backend_cases.spy_run_plans(monkeypatch)
  p = dict(problem=((24, 24), (5, 5), (1, 1), (1, 1), (False, False)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=3, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)
  small = masks.neighborhood((24, 24), 5)
  pick = cost.backward_tile_shapes(small, 128, 128)
  assert pick == ((8, 16), (16, 8)) and not cost.shares_backward_tiles(
      small, cost.auto_tiles(small, 128, 128), pick)
  assert plans and all(b is not None and (b.q_layout.tile_shape, b.kv_layout.tile_shape) == pick
                       and (f.q_layout.tile_shape, f.kv_layout.tile_shape) != pick
                       for f, b in plans)
  monkeypatch.undo()  # and no later test reuses a trace made under the knob
  ops._make_core.cache_clear()
  jax.clear_caches()


@pytest.mark.parametrize("shared", [True, pytest.param(False, marks=pytest.mark.extended)])
def test_forward_takes_backward_tiles(monkeypatch, shared):
  """Where the Hopper backward runs a 2-D window on tiles of its own and the forward's are no
  TMA boxes either (dilation), the forward runs on the backward's tiles: one plan for both
  passes (`cost.SHARED_TILES`; off: each its own), gradients against the brute force."""
  from jax_sparse_attn import ops
  from pallas_kernels.gpu.mosaic_gpu import cost
  monkeypatch.setattr(cost, "SHARED_TILES", shared)
  mask = masks.neighborhood((24, 24), 5, dilation=2)
  fwd, bwd = cost.auto_tiles(mask, 128, 128), cost.backward_tile_shapes(mask, 128, 128)
  assert fwd != bwd == ((8, 16), (8, 16))
  plans = backend_cases.spy_run_plans(monkeypatch)
  p = dict(problem=((24, 24), (5, 5), (1, 1), (2, 2), (False, False)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=5, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)
  tiles = lambda plan: (plan.q_layout.tile_shape, plan.kv_layout.tile_shape)
  assert plans and all((tiles(f), b) == (bwd, None) if shared else
                       (tiles(f), tiles(b)) == (fwd, bwd) for f, b in plans)
  monkeypatch.undo()
  ops._make_core.cache_clear()
  jax.clear_caches()


def test_shared_tiles_by_forward_cost(monkeypatch):
  """The forward keeps its own tiles where the backward's cost it more than
  `cost.SHARED_TILES_SLACK` in its model (64² k13: +29%, ran 21% slower), and takes them
  where the model ties (128² k33) or where one plan saves a kernel-order copy (k17
  dilation 4, no boxes either way)."""
  from pallas_kernels.gpu.mosaic_gpu import cost
  shares = lambda mask: cost.shares_backward_tiles(
      mask, cost.auto_tiles(mask, 128, 128), cost.backward_tile_shapes(mask, 128, 128))
  k13 = masks.neighborhood((64, 64), 13)
  assert not shares(k13)
  assert shares(masks.neighborhood((128, 128), 33))
  assert shares(masks.neighborhood((128, 128), 17, dilation=4))
  monkeypatch.setattr(cost, "SHARED_TILES_SLACK", 0.5)  # the cost is what refuses k13
  assert shares(k13)
  monkeypatch.undo()
  # With a padding mask the forward's cost is that of grid tiles with the element test: 96²
  # k17's window-box tiles lose to the backward's there (their forward ran 0.52 vs 0.39 ms),
  # its tiles for the element test win (0.37).
  k17 = masks.neighborhood((96, 96), 17)
  bwd = cost.backward_tile_shapes(k17, 128, 128)
  boxes, element = cost.auto_tiles(k17, 128, 128), cost.auto_tiles(k17, 128, 128, True)
  assert not cost.shares_backward_tiles(k17, boxes, bwd)
  assert cost.shares_backward_tiles(k17, boxes, bwd, True)
  assert not cost.shares_backward_tiles(k17, element, bwd, True)


def test_work_items():
  """One item per KV block, in KV-block order (neighbouring KV blocks share Q blocks in L2),
  except Q lists longer than twice the mean (a sink's): those are cut into chunks of the mean
  (rounded up). KV blocks with empty lists get no item."""
  from pallas_kernels.gpu.mosaic_gpu.work_items import static_items
  items = static_items(np.array([20, 2, 0, 3]))  # 20 > 2 * 8.3: chunks of 9
  assert items.tolist() == [[0, 0, 9], [0, 9, 9], [0, 18, 2], [1, 0, 2], [3, 0, 3]]
  items = static_items(np.array([30, 6, 7, 5, 7]))  # mean 11: 30 cut into 11s, 6-7 whole
  assert items.tolist() == [[0, 0, 11], [0, 11, 11], [0, 22, 8], [1, 0, 6], [2, 0, 7],
                            [3, 0, 5], [4, 0, 7]]
  items = static_items(np.array([6, 9, 12, 9, 0, 15]))  # 15 <= 2 * 10.2: whole lists
  assert items.tolist() == [[0, 0, 6], [1, 0, 9], [2, 0, 12], [3, 0, 9], [5, 0, 15]]
  assert static_items(np.zeros(4, int)).shape == (0, 3)


@pytest.mark.extended  # lab knobs' other orders
def test_grid_orders_agree(monkeypatch):
  """The lab knobs that put work items (dK/dV) and Q blocks (dQ) on the grid's fastest axis
  give the default's gradients, bit for bit (the same items, in another order)."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd_dq, work_items
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 200, 2, 64)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((1, 200, 1, 64)), jnp.bfloat16) for _ in range(2))
  mask = masks.causal() & (masks.sliding_window(90) | masks.sink(3))
  loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, mask, backend="mosaic_gpu",
                                               interpret=True, config=BWD).astype(jnp.float32))
  grad = lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # traced anew each call
  want = grad()
  monkeypatch.setattr(work_items, "ITEMS_FASTEST", not work_items.ITEMS_FASTEST)
  monkeypatch.setattr(attention_bwd_dq, "Q_FASTEST", not attention_bwd_dq.Q_FASTEST)
  for g, w in zip(grad(), want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  assert float(jnp.abs(want[1].astype(jnp.float32)).sum()) > 0


@pytest.mark.parametrize("mixed, head_dim, dq", [
    (True, 64, None), pytest.param(False, 64, None, marks=pytest.mark.extended),
    (True, 128, "split")])
def test_sink_list_in_chunks(monkeypatch, mixed, head_dim, dq):
  """A sink's KV block is visited by every query block: its list runs as several items whose
  dK/dV add up (640 tokens: 5 blocks, the first visited 5 times, the rest about twice; items
  of the mean list length, 3 entries).
  ``mixed`` (`attention_bwd.MIXED_DKV`): only the cut block's items reduce-add (into its own
  float32 buffer), the others store dK/dV; with dQ fused into the kernel too."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, work_items
  monkeypatch.setattr(attention_bwd, "MIXED_DKV", mixed)
  p = dict(batch=1, sq=640, skv=640, heads=2, kv_heads=1, head_dim=head_dim,
           mask="window_sink", segments=False, dtype=jnp.bfloat16, seed=3)
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640), SequenceLayout(640, 128),
                   SequenceLayout(640, 128))
  items = work_items.static_items(plan.block_map.q_counts)
  assert np.sum(items[:, 0] == 0) == 2
  slots, cut_blocks = work_items.cut_slots(items)
  assert cut_blocks.tolist() == [0] and slots.tolist() == [0, 0] + [-1] * (len(items) - 2)
  config = MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=config)
  if mixed and head_dim == 64:  # it lowers for CUDA: the forward and both backward kernels
    # in one launch (the export does not depend on the parameters above)
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jsa.attention(
        q, k, v, masks.causal() & (masks.sliding_window(255) | masks.sink(4)),
        backend="mosaic_gpu", config=BWD).astype(jnp.float32))
    text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 2048, 4, 128),
                          S(1, 2048, 2, 128), S(1, 2048, 2, 128)).mlir_module()
    assert text.count("@mosaic_gpu_v2(") == 2


def _lm_mask_lowers():
  """The LM layer's mask (`causal & (window 255 | 4 sinks)`, GQA 4/2) lowers for CUDA, forward
  and backward, under the knobs the caller set (dead quarters skipped in both backward
  kernels: `QUARTERS`, `QUARTERS_DQ`)."""
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, masks.causal() & (masks.sliding_window(255) | masks.sink(4)),
      backend="mosaic_gpu", config=BWD).astype(jnp.float32))
  export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 2048, 4, 128), S(1, 2048, 2, 128),
                 S(1, 2048, 2, 128)).mlir_module()


def test_quarters(monkeypatch):
  """`policy.QUARTERS`: a dK/dV warpgroup skips the partial steps whose 64 queries
  none of its 64 keys may see (the sink block's second half seen from far queries, the causal
  diagonal's corner): gradients vs the brute force, GQA; the map has such
  quarters, and the kernel lowers with them."""
  from pallas_kernels.gpu.mosaic_gpu import policy, tables
  monkeypatch.setattr(policy, "QUARTERS", True)
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640), SequenceLayout(640, 128),
                   SequenceLayout(640, 128))
  _, bits = tables.live_quarters(plan)
  visited = np.arange(bits.shape[1])[None] < np.asarray(plan.block_map.q_counts)[:, None]
  assert np.any(visited & (bits != 15))  # some visited block has a dead quarter
  def share(mask, s):
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    return policy.dead_share(plan.block_map, tables.live_quarters(plan)[1])
  lm = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
  assert share(lm, 8192) > policy.QUARTERS_MIN_DEAD  # "auto" skips there
  window = masks.causal() & masks.sliding_window(2047)
  assert share(window, 32768) < policy.QUARTERS_MIN_DEAD  # every step runs there
  p = dict(batch=1, sq=640, skv=640, heads=2, kv_heads=1, head_dim=64, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=5)  # (segment ids: a runtime map)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                config=MosaicGPUConfig(backward="mosaic_gpu"))
  _lm_mask_lowers()


def _quarter_truth(plan, dense, q_layout, kv_layout):
  """Per visited entry of the transposed map: the 4 quarter bits from the dense mask (caller
  order) through the layouts' kernel order."""
  to_rows = lambda layout, n: np.asarray(layout.to_kernel(
      np.arange(1, n + 1).reshape(1, *layout.spatial_shape)))[0] - 1
  n = dense.shape[0]
  q_rows, k_rows = to_rows(q_layout, n), to_rows(kv_layout, n)
  bm = plan.block_map
  out = np.zeros(np.asarray(bm.q_ids).shape, np.int32)
  for kb in range(bm.num_kv_blocks):
    for e in range(int(bm.q_counts[kb])):
      qb = int(bm.q_ids[kb, e])
      for p in range(2):
        for h in range(2):
          rows = q_rows[qb * 128 + p * 64: qb * 128 + (p + 1) * 64]
          cols = k_rows[kb * 128 + h * 64: kb * 128 + (h + 1) * 64]
          rows, cols = rows[rows >= 0], cols[cols >= 0]
          if len(rows) and len(cols) and dense[np.ix_(rows, cols)].any():
            out[kb, e] |= 1 << (2 * p + h)
  return out


@pytest.mark.parametrize("spatial, kernel, tile", [
    ((24, 40), (7, 9), (8, 16)), ((6, 12, 20), (3, 5, 7), (2, 4, 16))])
def test_live_quarters_brute_force(monkeypatch, spatial, kernel, tile):
  """`tables.live_quarters` on a neighborhood (a product of per-dim intervals on box tiles,
  so exact): each partial entry's bit (64-row query part, 64-key half) is set iff some pair
  in that quarter attends in the brute-force mask; full entries have every bit. Both forms:
  per dim (`tables.SEPARABLE_QUARTERS`, the default for neighborhoods) and row by row with
  the partial entries in chunks of 5 (`tables._ENTRY_CHUNK`)."""
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered
  from pallas_kernels.gpu.mosaic_gpu import tables
  layout = TiledLayout(spatial, (1,) * len(spatial), tile)
  plan = gathered(make_plan(masks.neighborhood(spatial, kernel), layout, layout))
  dense = brute_force.gna_mask(spatial, kernel, (1,) * len(spatial), (1,) * len(spatial),
                               (False,) * len(spatial))
  truth = _quarter_truth(plan, dense, layout, layout)
  bm = plan.block_map
  e = np.arange(truth.shape[1])[None]
  full = e < np.asarray(bm.q_full_counts)[:, None]
  partial = ~full & (e < np.asarray(bm.q_counts)[:, None])
  assert partial.any() and np.any(truth[partial] != 15)  # the map has dead quarters
  for separable, chunk in ((True, tables._ENTRY_CHUNK), (False, 5)):
    monkeypatch.setattr(tables, "SEPARABLE_QUARTERS", separable)
    monkeypatch.setattr(tables, "_ENTRY_CHUNK", chunk)
    _, t_bits = tables._live_quarters.__wrapped__(plan)
    assert np.all(t_bits[full] == 15)
    np.testing.assert_array_equal(t_bits[partial], truth[partial])


@settings(max_examples=examples(30), deadline=None)
@given(problem=gna_problems(max_ndim=3, max_len=14))
def test_live_quarters_separable(problem):
  """A neighborhood's quarters per dim (`tables.SEPARABLE_QUARTERS`: each dim's valid rows
  reduced to one range per 64-row part) on random neighborhoods (stride, dilation, causal
  dims, padding; the simulator's tiles): every partial entry's bits are exactly the dense
  mask's, and never more than the row-by-row test's (which also keeps parts of padding
  rows)."""
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered
  from jax_sparse_attn.simulate import best_tile_shapes
  from pallas_kernels.gpu.mosaic_gpu import tables
  spatial, kernel, stride, dilation, causal = problem
  mask = masks.neighborhood(spatial, kernel, stride, dilation, causal)
  tq, tk = best_tile_shapes(mask, 128, 128)
  q_layout, kv_layout = TiledLayout(spatial, dilation, tq), TiledLayout(spatial, dilation, tk)
  plan = gathered(make_plan(mask, q_layout, kv_layout))
  _, fast = tables._live_quarters.__wrapped__(plan)
  try:
    tables.SEPARABLE_QUARTERS = False
    _, rows = tables._live_quarters.__wrapped__(plan)
  finally:
    tables.SEPARABLE_QUARTERS = True
  bm = plan.block_map
  e = np.arange(fast.shape[1])[None]
  partial = (e >= np.asarray(bm.q_full_counts)[:, None]) & (e < np.asarray(bm.q_counts)[:, None])
  truth = _quarter_truth(plan, brute_force.gna_mask(*problem), q_layout, kv_layout)
  np.testing.assert_array_equal(np.where(partial, fast, 0), np.where(partial, truth, 0))
  assert not np.any(fast & ~rows)


def _assert_dead_quarters():
  """The 384-token `window_sink` map of the quarter tests has visited blocks with dead 64x64
  quarters (`tables.live_quarters`)."""
  from pallas_kernels.gpu.mosaic_gpu import tables
  plan = make_plan(backend_cases.seq_mask("window_sink", 384, 384), SequenceLayout(384, 128),
                   SequenceLayout(384, 128))
  bits, _ = tables.live_quarters(plan)
  visited = np.arange(bits.shape[1])[None] < np.asarray(plan.block_map.kv_counts)[:, None]
  assert np.any(visited & (bits != 15))


@pytest.mark.parametrize("joint", [True, pytest.param(False, marks=pytest.mark.extended)])
def test_quarters_dq(monkeypatch, joint):
  """`attention_bwd.QUARTERS_DQ`: the dQ kernel's warpgroups skip the 64-key halves of
  partial blocks that none of their 64 queries may see (the joint launch, and dQ's own
  launch, `JOINT_DQ=False`): gradients vs the brute force, GQA; the map has such halves. (The
  kernels lower with these skips: test_quarters.)"""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, policy
  monkeypatch.setattr(policy, "QUARTERS", True)
  monkeypatch.setattr(attention_bwd, "QUARTERS_DQ", True)
  _assert_dead_quarters()
  p = dict(batch=1, sq=384, skv=384, heads=2, kv_heads=1, head_dim=64, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=8)
  monkeypatch.setattr(attention_bwd, "JOINT_DQ", joint)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                config=MosaicGPUConfig(backward="mosaic_gpu"))


def test_direct_dkv(monkeypatch):
  """The lab knob `attention_bwd.DIRECT_DKV`: with one work item per KV block the dK/dV kernel
  stores dK/dV in the input dtype instead of reduce-adding float32; KV blocks no query visits
  (keys past the queries' causal reach) stay zero. It lowers for CUDA too."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  monkeypatch.setattr(attention_bwd, "DIRECT_DKV", True)
  p = dict(batch=1, sq=200, skv=345, heads=4, kv_heads=2, head_dim=64, mask="masked_rows",
           segments=False, dtype=jnp.bfloat16, seed=11)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=BWD)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, masks.causal() & masks.sliding_window(255), backend="mosaic_gpu",
      config=BWD).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 1000, 4, 128),
                        S(1, 1000, 2, 128), S(1, 1000, 2, 128)).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 2  # dQ in the dK/dV launch


def _gpu_launches(mask, cfg) -> int:
  """Mosaic GPU launches in fwd+bwd on `mask` (1000 tokens, GQA 4/2, head_dim 128, bf16)
  exported for CUDA on the CPU."""
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, mask, backend="mosaic_gpu", config=cfg).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 1000, 4, 128),
                        S(1, 1000, 2, 128), S(1, 1000, 2, 128)).mlir_module()
  return text.count("@mosaic_gpu_v2(")


@pytest.mark.parametrize("form,on", [
    ("split", True), pytest.param("kernel", True, marks=pytest.mark.extended),
    pytest.param("split", False, marks=pytest.mark.extended),
    pytest.param("kernel", False, marks=pytest.mark.extended)])
def test_lse_in_acc(monkeypatch, form, on):
  """`attention_bwd.LSE_IN_ACC` (on by default; off: the earlier form): Sᵀ and dPᵀ start from
  −lse₂ / (scale·log2 e) and −delta instead of subtracting them after the wgmmas (the fused
  form at 128 columns; the two kernels): gradients vs the brute force with fully masked rows
  (lse₂ = +inf: zero gradients, not NaN) and GQA; the accumulators' initial values lower for
  CUDA."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  monkeypatch.setattr(attention_bwd, "LSE_IN_ACC", on)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq=form)
  p = dict(batch=1, sq=200, skv=345, heads=4, kv_heads=2, head_dim=128 if form == "split" else 64,
           mask="masked_rows", segments=False, dtype=jnp.bfloat16, seed=12)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=cfg)
  assert _gpu_launches(masks.causal(), cfg) == 2  # the forward, the backward (one launch)


@pytest.mark.parametrize("on", [True, pytest.param(False, marks=pytest.mark.extended)])
def test_deferred_dq(monkeypatch, on):
  """`attention_bwd.DEFERRED_DQ` (on by default; off: each step's rendezvous): the fused form
  at 128 columns forms step t−1's dQ at step t (a zero dQ at the first step, the last one
  after the loop), the warpgroups meeting on per-buffer barriers: gradients vs the brute
  force with fully masked rows and GQA (two query heads walk one list); it lowers for CUDA,
  also with the schedule barrier ("pingpong")."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  monkeypatch.setattr(attention_bwd, "DEFERRED_DQ", on)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split")
  p = dict(batch=1, sq=200, skv=345, heads=4, kv_heads=2, head_dim=128, mask="masked_rows",
           segments=False, dtype=jnp.bfloat16, seed=13)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=cfg)
  for form in (on, "pingpong") if on else (on,):
    monkeypatch.setattr(attention_bwd, "DEFERRED_DQ", form)
    assert _gpu_launches(masks.causal(), cfg) == 2


@pytest.mark.extended
def test_fused_quarters(monkeypatch):
  """The lab knob `policy.FUSED_QUARTERS`: the deferred fused form skips the partial steps
  whose queries none of a warpgroup's keys may see (zeros as its half of dSᵀ, dQ(t−1) still
  formed): gradients vs the brute force on a map with such quarters (GQA), and the policy
  then fuses maps with dead quarters; it lowers for CUDA."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, policy
  monkeypatch.setattr(policy, "QUARTERS", True)
  monkeypatch.setattr(policy, "FUSED_QUARTERS", True)
  monkeypatch.setattr(attention_bwd, "DEFERRED_DQ", True)
  _assert_dead_quarters()
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split")
  p = dict(batch=1, sq=384, skv=384, heads=2, kv_heads=1, head_dim=128, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=9)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=cfg)
  assert _gpu_launches(masks.causal() & (masks.sliding_window(255) | masks.sink(4)), cfg) == 2
  lm = make_plan(masks.causal() & (masks.sliding_window(511) | masks.sink(4)),
                 SequenceLayout(16384, 128), SequenceLayout(16384, 128))
  cfg_auto = mgpu.config._config(MosaicGPUConfig(backward="mosaic_gpu"))
  assert policy.dead_quarters(cfg_auto, lm, lm.block_map) is not None
  monkeypatch.setattr(policy, "FUSED_MIN_ENTRIES_SHORT", 1)
  assert not policy.separate_dq(cfg_auto, lm, 128)


@pytest.mark.parametrize("written", [True, pytest.param(False, marks=pytest.mark.extended)])
def test_written_dkv(monkeypatch, written):
  """`attention_bwd.WRITTEN_DKV`: where every KV block is one item's (causal self-attention,
  dQ as its own kernel), dK/dV are the kernel's outputs rather than zero-filled buffers:
  every row must be stored (interpret mode leaves an output's unwritten rows NaN)."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  monkeypatch.setattr(attention_bwd, "WRITTEN_DKV", written)
  p = dict(batch=1, sq=300, skv=300, heads=4, kv_heads=2, head_dim=64, mask="causal",
           segments=False, dtype=jnp.bfloat16, seed=5)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                config=MosaicGPUConfig(backward="mosaic_gpu",
                                                       backward_dq="kernel"))


def test_fused_dq_policy(monkeypatch):
  """backward_dq=None fuses dQ into the dK/dV kernel at head_dim 128 where KV blocks visit
  at least `FUSED_MIN_ENTRIES` Q blocks on average (dense S=8192: 64, causal: 32.5), or
  `FUSED_MIN_ENTRIES_SHORT` on even lists (the causal window 2048: 16.5, not causal S=4096's
  triangle) where dQ's window-anchored boxes do not pay (a strided 3-D neighborhood at ~16
  keeps two kernels), and the map has no dead
  quarters for the dK/dV kernel to skip (a 3-D neighborhood with 11%), else dQ is its own
  kernel (the LM mask: 5.8); at head_dim 64 from `FUSED_MIN_ENTRIES_64`
  on every mask (causal S=4096 and a 2-D k33 at ~15 fused, the LM mask's 5.8 not; a 3-D
  neighborhood with dead quarters fused too), with `FUSED_STAGES_64` slots; explicit forms win. The fused dense backward lowers to one kernel
  beside the forward."""
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered
  from pallas_kernels.gpu.mosaic_gpu import policy, tables
  seq = lambda m, s: make_plan(m, SequenceLayout(s, 128), SequenceLayout(s, 128))
  dense, causal = seq(masks.full(), 8192), seq(masks.causal(), 8192)
  cfg = lambda dq=None: mgpu.config._config(MosaicGPUConfig(backward="mosaic_gpu",
                                                            backward_dq=dq))
  assert policy.mean_entries(dense.block_map) == 64
  assert not policy.separate_dq(cfg(), dense, 128)
  assert not policy.separate_dq(cfg(), dense, 64)
  assert not policy.separate_dq(cfg(), seq(masks.causal(), 4096), 64)
  lm = seq(masks.causal() & (masks.sliding_window(511) | masks.sink(4)), 8192)
  assert policy.mean_entries(lm.block_map) < policy.FUSED_MIN_ENTRIES_64
  assert policy.separate_dq(cfg(), lm, 64)
  assert policy.separate_dq(cfg(), dense, 96)  # not measured there: two kernels
  assert not policy.separate_dq(cfg(), causal, 128)  # 32.5
  # causal S=4096: 16.5 on average but uneven lists (lower quartile 8.75): two kernels; the
  # causal window's even lists (16.5, lower quartile 17) fuse
  assert policy.short_entries(seq(masks.causal(), 4096).block_map) == 8.75
  assert policy.separate_dq(cfg(), seq(masks.causal(), 4096), 128)
  assert not policy.separate_dq(cfg(), seq(masks.causal() & masks.sliding_window(2047), 32768),
                                128)
  assert policy.mean_entries(lm.block_map) < policy.FUSED_MIN_ENTRIES_SHORT
  assert policy.separate_dq(cfg(), lm, 128)
  assert policy.separate_dq(cfg("kernel"), dense, 128)
  assert not policy.separate_dq(cfg("split"), causal, 128)
  tile = TiledLayout((16, 32, 32), (1, 1, 1), (2, 4, 16))
  na3 = gathered(make_plan(masks.neighborhood((16, 32, 32), (8, 16, 16)), tile, tile))
  share = policy.dead_share(na3.block_map, tables.live_quarters(na3)[1])
  assert policy.mean_entries(na3.block_map) >= policy.FUSED_MIN_ENTRIES
  assert share >= policy.QUARTERS_MIN_DEAD and policy.separate_dq(cfg(), na3, 128)
  assert not policy.separate_dq(cfg(), na3, 64)
  tile2 = TiledLayout((128, 128), (1, 1), (8, 16))
  na2 = gathered(make_plan(masks.neighborhood((128, 128), (33, 33)), tile2, tile2))
  assert policy.FUSED_MIN_ENTRIES_64 <= policy.mean_entries(na2.block_map) < 16
  assert not policy.separate_dq(cfg(), na2, 64)
  assert policy.separate_dq(cfg(), na2, 128)  # at 128: dead quarters to skip
  monkeypatch.setattr(policy, "QUARTERS", False)  # no skips: fused
  assert not policy.separate_dq(cfg(), na3, 128)
  assert policy.short_entries(na2.block_map) < policy.FUSED_MIN_ENTRIES_SHORT  # 11.5: edges
  assert policy.separate_dq(cfg(), na2, 128)
  tile_s = TiledLayout((8, 32, 32), (1, 1, 1), (2, 8, 8))
  strided = gathered(make_plan(masks.neighborhood((8, 32, 32), (4, 16, 16), stride=(2, 8, 8)),
                               tile_s, tile_s))
  assert policy.FUSED_MIN_ENTRIES_SHORT <= policy.mean_entries(strided.block_map) < 24
  assert policy.separate_dq(cfg(), strided, 128)  # dQ on window boxes
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  f = lambda q, k, v: jsa.attention(q, k, v, masks.full(), backend="mosaic_gpu",
                                    config=MosaicGPUConfig(backward="mosaic_gpu"))
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 8192, 2, 128),
                        S(1, 8192, 2, 128), S(1, 8192, 2, 128)).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 2


@pytest.mark.extended  # JOINT_DQ=False: every other backward test runs the joint launch
@pytest.mark.parametrize("case", ["sinks", "gqa_batch", "documents"])
def test_joint_dq(monkeypatch, case):
  """`attention_bwd.JOINT_DQ`: dQ's CTAs after the dK/dV work items in one launch give the
  gradients of two launches, bit for bit (interpret mode runs the grid in order; GQA with
  batch 2: the program id's decode into item, head and batch, dK/dV written as outputs), and
  the one launch against the float64 brute force on that case, a sink's list cut into
  several items (mixed dK/dV stores and float32 buffers) and documents (a runtime map over
  the static items).
  One launch for both backward kernels on CUDA."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  mask = {"sinks": "window_sink", "gqa_batch": "causal", "documents": "window_sink"}[case]
  n = {"sinks": 640, "gqa_batch": 260, "documents": 384}[case]  # 640: the sink's list is cut
  p = dict(batch=2 if case == "gqa_batch" else 1, sq=n, skv=n, heads=2, kv_heads=1,
           head_dim=64, mask=mask, segments=case == "documents", dtype=jnp.bfloat16, seed=7)
  config = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel")
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  m = backend_cases.seq_mask(mask, p["sq"], p["skv"])
  seg = (jnp.asarray(np.repeat(np.arange(4), n // 4)[None], jnp.int32)
         if case == "documents" else None)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, m, segment_ids=seg, backend="mosaic_gpu", interpret=True,
      config=config).astype(jnp.float32) * d_out.astype(jnp.float32))
  grads = {}
  for joint in (True, False) if case == "gqa_batch" else (True,):
    monkeypatch.setattr(attention_bwd, "JOINT_DQ", joint)
    jax.clear_caches()
    grads[joint] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads[True], grads[False]) if False in grads else ():
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  dense = np.asarray(m(np.arange(p["sq"])[:, None], np.arange(p["skv"])[None, :]))
  want = brute_force.attention_grads(q, k, v, dense, 1.0 / math.sqrt(p["head_dim"]), d_out,
                                     seg, seg)
  tol = backend_cases.TOL[jnp.bfloat16]
  for name, got, ref in zip("qkv", grads[True], want):
    err = brute_force.rel_err(got, ref)
    assert err < tol * 2 or backend_cases._small(got, ref, tol), (name, err)
  if case != "gqa_batch":
    return
  monkeypatch.setattr(attention_bwd, "JOINT_DQ", True)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  cuda = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu",
                                               config=config).astype(jnp.float32))
  text = export_for_gpu(jax.grad(cuda, argnums=(0, 1, 2)), S(2, 1000, 4, 64),
                        S(2, 1000, 2, 64), S(2, 1000, 2, 64)).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 2



@pytest.mark.parametrize("mask, segments", [("masked_rows", False), ("window_sink", True)])
def test_fused_at_head_dim_64(monkeypatch, mask, segments):
  """At head_dim 64 the default fuses dQ into the dK/dV kernel on 1-D masks with long lists
  (`FUSED_MIN_ENTRIES_64`, the "own" form) over `FUSED_STAGES_64` Q/dO slots: against the
  float64 brute force in interpret mode (the threshold lowered and dead-quarter skips off to
  reach it on a small problem; GQA with rows that see nothing, or packed documents: the
  runtime map over the static items), and dense S=8192 lowers to the fused kernel (no joint
  dQ launch) where the LM mask keeps the two kernels."""
  from jax_sparse_attn import ops
  from pallas_kernels.gpu.mosaic_gpu import policy
  calls = backend_cases.spy_backward_kernels(monkeypatch)
  monkeypatch.setattr(policy, "FUSED_MIN_ENTRIES_64", 1)
  monkeypatch.setattr(policy, "QUARTERS", False)  # the small causal map's dead quarters
  ops._make_core.cache_clear()
  jax.clear_caches()
  p = dict(batch=1, sq=384, skv=384, heads=4, kv_heads=2, head_dim=64, mask=mask,
           segments=segments, dtype=jnp.bfloat16, seed=7)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=BWD)
  stages = {(kw["stages"], kw["split_dq"], kw["with_dq"]) for kw in calls}
  assert stages == {(policy.FUSED_STAGES_64, False, True)}
  monkeypatch.undo()
  ops._make_core.cache_clear()
  jax.clear_caches()
  if segments:
    return
  S = jax.ShapeDtypeStruct((1, 8192, 2, 64), jnp.bfloat16)
  lowered = lambda mask: export_for_gpu(jax.grad(lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, mask, backend="mosaic_gpu", config=BWD).astype(jnp.float32)),
      argnums=(0, 1, 2)), S, S, S).mlir_module()
  assert "sparse_attention_bwd_joint" not in lowered(masks.full())
  assert "sparse_attention_bwd_joint" in lowered(
      masks.causal() & (masks.sliding_window(511) | masks.sink(4)))


@pytest.mark.parametrize("head_dim, case", [
    (64, "na"), pytest.param(96, "na", marks=pytest.mark.extended), (96, "seq")])
def test_slots_by_head_dim(monkeypatch, head_dim, case):
  """The default's forms and Q/dO slots by width, against the float64 brute force in
  interpret mode: at 64 a neighborhood with the MMA-bias tables fuses dQ ("own", thresholds
  lowered to reach it on a small problem) over `FUSED_STAGES_64` slots; at 96 the two kernels
  run over `STAGES_96` slots on a 1-D mask (GQA, packed documents) and over `STAGES` where
  the MMA-bias tables are staged beside them."""
  from jax_sparse_attn import ops
  from pallas_kernels.gpu.mosaic_gpu import policy
  calls = backend_cases.spy_backward_kernels(monkeypatch)
  monkeypatch.setattr(policy, "FUSED_MIN_ENTRIES_64", 1)
  ops._make_core.cache_clear()
  jax.clear_caches()
  if case == "na":
    problem = ((12, 21), (5, 9), (2, 3), (1, 1), (True, False))
    p = dict(problem=problem, batch=1, heads=2, kv_heads=1, head_dim=head_dim,
             dtype=jnp.bfloat16, seed=3, tile_q=(8, 16), tile_kv=(8, 16))
    backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)
    want = ((policy.FUSED_STAGES_64, True, True) if head_dim == 64
            else (policy.STAGES, False, True))
  else:
    p = dict(batch=1, sq=300, skv=300, heads=4, kv_heads=2, head_dim=head_dim,
             mask="window_sink", segments=True, dtype=jnp.bfloat16, seed=9)
    backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=BWD)
    want = (policy.STAGES_96, False, False)
  forms = {(kw["stages"], kw["with_dq"], kw["mma_width"] > 0) for kw in calls}
  assert forms == {want}, forms
  monkeypatch.undo()
  ops._make_core.cache_clear()
  jax.clear_caches()
