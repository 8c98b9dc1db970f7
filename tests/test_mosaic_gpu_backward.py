"""The Hopper backward (Pallas Mosaic GPU, `attention_bwd`) in GPU interpret mode (CPU) vs the
float64 brute force: every 1-D mask (unions with sinks, `from_function`, rows that see
nothing), segment ids, GQA, odd lengths, head dims 32-128 (padded), bf16 and fp16, every dQ
form (its own kernel, or reduce-added "split" / "own"); neighborhoods (stride, dilation,
causal dims) with the Mosaic GPU backward asked for; CUDA lowering on CPU."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_cases
import brute_force
from strategies import examples, gna_problems
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.gpu import MosaicGPUConfig, export_for_gpu
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from pallas_kernels.gpu import mosaic_gpu as mgpu

BWD = MosaicGPUConfig(backward="mosaic_gpu")


@settings(max_examples=examples(3), deadline=None)
@given(p=backend_cases.seq_problems(max_len=300, dtypes=(jnp.bfloat16, jnp.float16)),
       head_dim=st.sampled_from([32, 40, 64, 80, 96, 128]),
       dq=st.sampled_from([None, "kernel", "own", "split"]))
def test_attention(p, head_dim, dq):
  if dq == "split":
    head_dim = 128
  p = dict(p, head_dim=head_dim)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq))


@settings(max_examples=examples(2), deadline=None)
@given(p=backend_cases.seq_problems(max_len=200, dtypes=(jnp.bfloat16, jnp.float16)),
       head_dim=st.sampled_from([136, 192, 256]))
def test_attention_wide(p, head_dim):
  """head_dim 129-256 (136 at 160 columns, 192 at 192, 256 at 256): the role-split kernels
  (`attention_bwd_wide`), the default backward there."""
  backend_cases.check_attention(dict(p, head_dim=head_dim), "mosaic_gpu", interpret=True)


@pytest.mark.parametrize("mask, segments, kv_heads, head_dim", [
    ("masked_rows", False, 2, 256), ("window_sink", True, 1, 192), ("function", False, 1, 176)])
def test_attention_wide_cases(mask, segments, kv_heads, head_dim):
  """Fixed wide cases: rows that see nothing (zero gradients, never NaN), GQA with segment
  ids on the union an LM uses (a documents' runtime map), a mask function; at 256 columns and
  at 192 (176 padded to 192)."""
  p = dict(batch=1, sq=140, skv=140, heads=4, kv_heads=kv_heads, head_dim=head_dim,
           mask=mask, segments=segments, dtype=jnp.bfloat16, seed=5)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)


def test_na_wide():
  """A 2-D neighborhood (stride, causal dim) at head_dim 256: the role-split kernels in kernel
  order (the default backward there: `hopper_backward_neighborhood`), element tests (no MMA
  bias); no Triton call."""
  assert mgpu.default_backward_map_blocks(256, jnp.bfloat16, BWD) == (128, 64)
  p = dict(problem=((12, 21), (5, 9), (2, 3), (1, 1), (True, False)), batch=1, heads=2,
           kv_heads=1, head_dim=256, dtype=jnp.bfloat16, seed=4, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True)
  S = jax.ShapeDtypeStruct((1, 32, 32, 2, 256), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.na2d(q, k, v, (5, 9), stride=(2, 3), backend="mosaic_gpu")
                                 .astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S, S, S).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 3 and "__gpu$xla.gpu.triton" not in text


def test_wide_sink_items(monkeypatch):
  """A sink's list cut into several dK/dV items at head_dim 256 (float32 reduce-adds instead
  of stores): 640 tokens, 10 KV blocks of 64, the first visited by all 5 Q blocks (items of
  the mean list length, 2 entries)."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640),
                   SequenceLayout(640, 128), SequenceLayout(640, 64))
  items = attention_bwd._work_items(plan.block_map.q_counts)
  assert np.sum(items[:, 0] == 0) > 1 and len(np.unique(items[:, 0])) < len(items)
  p = dict(batch=1, sq=640, skv=640, heads=1, kv_heads=1, head_dim=256, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=9)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)


def test_pingpong_config():
  """The ping-pong schedule takes the "own" dQ form (interpret mode runs it without the
  schedule barrier: the same arithmetic); with "split" it is a ValueError."""
  p = dict(batch=1, sq=200, skv=200, heads=2, kv_heads=1, head_dim=128, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=3)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=MosaicGPUConfig(
      backward="mosaic_gpu", backward_pingpong=True))
  x = jnp.ones((1, 128, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="backward_pingpong needs backward_dq='own'"):
    jsa.attention(x, x, x, masks.causal(), backend="mosaic_gpu", interpret=True,
                  config=MosaicGPUConfig(backward_pingpong=True, backward_dq="split"))


@pytest.mark.parametrize("mask, segments, dq", [
    ("window_sink", True, None), ("masked_rows", False, None), ("function", True, None),
    ("full", True, None), ("window_sink", True, "split"), ("masked_rows", False, "own")])
def test_attention_cases(mask, segments, dq):
  """Fixed cases beside the random ones: 128-row GQA groups, the union an LM uses, rows that
  see nothing (zeros and zero gradients, never NaN), segment ids on a dense map; the dQ
  kernel (the default) and the reduce-added forms."""
  p = dict(batch=1, sq=257, skv=257, heads=4,
           kv_heads=1, head_dim=128, mask=mask, segments=segments, dtype=jnp.bfloat16, seed=7)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                config=MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq))


def test_union_terms():
  """A union of three interval terms (window | sink | block-local, each & causal) with segment
  ids and GQA runs as intervals per term (`element.mask_vectors`: no mask function) forward
  and backward; gradients against the brute force."""
  from pallas_kernels.gpu.mosaic_gpu import element
  plan = make_plan(backend_cases.seq_mask("union3", 300, 300), SequenceLayout(300, 128),
                   SequenceLayout(300, 128))
  lo, _, c, terms, mask_fn = element.mask_vectors(plan)
  assert terms == 3 and lo.shape == (3, 384) and c.shape == (3, 384)
  assert plan.mask_fn is not None and mask_fn is None  # other backends: the mask function
  p = dict(batch=1, sq=300, skv=300, heads=4, kv_heads=2, head_dim=64, mask="union3",
           segments=True, dtype=jnp.bfloat16, seed=11)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=BWD)


@settings(max_examples=examples(1), deadline=None)
@given(p=backend_cases.na_problems(dtypes=(jnp.bfloat16,)))
def test_na(p):
  p = dict(p, head_dim=64, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)


def test_na1d():
  """A 1-D neighborhood (odd length, dilation, causal, GQA) on these kernels, which `auto`
  takes for 1-D neighborhoods at head_dim 65-128 (`test_picks`)."""
  p = dict(problem=((300,), (33,), (1,), (2,), (True,)), batch=1, heads=2, kv_heads=1,
           head_dim=64, dtype=jnp.bfloat16, seed=5, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)


@pytest.mark.parametrize("problem, tile", [
    (((12, 21), (5, 9), (2, 3), (1, 1), (True, False)), (8, 16)),
    (((4, 8, 16), (3, 5, 7), (1, 2, 1), (1, 1, 1), (False, True, False)), (2, 4, 16)),
    (((12, 21), (5, 9), (1, 1), (1, 1), (False, False)), None)])
def test_na_mma_bias(monkeypatch, problem, tile):
  """Neighborhoods on the Hopper backward with the forward's MMA bias in both kernels (128-row
  tiles, so the tables apply; stride, a causal dim, 3-D, GQA, odd sizes, the default tiles)
  against the brute force, forward and gradients. (GQA at the default tiles deadlocked GPU
  interpret mode under XLA:CPU's concurrency-optimized scheduler: tests/conftest.py.)"""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, tables
  built = []

  def spy(plan, scale):
    built.append(tables.backward_mma_inputs(plan, scale))
    return built[-1]

  monkeypatch.setattr(attention_bwd, "backward_mma_inputs", spy)
  p = dict(problem=problem, batch=1, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
           seed=1, tile_q=tile, tile_kv=tile)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)
  assert built and all(x is not None for x in built)


def test_quarter_tiles(monkeypatch):
  """The backward's tiles by live 64x64 quarters (`cost.backward_tile_shapes`, with
  `QUARTER_TILES` on): 2-D 128² k33 takes (16, 8) tiles (the same 1920 blocks, 6400 live
  quarters instead of 6912), the simulator's with `QUARTER_TILES` off; on 24×24 k5 it picks
  (4, 32) tiles, not the forward's (8, 16) / (4, 16): the backward's own gathered plan,
  whose gradients match the brute force."""
  from jax_sparse_attn import ops
  from jax_sparse_attn.simulate import best_tile_shapes, visited_blocks
  from pallas_kernels.gpu.mosaic_gpu import cost
  monkeypatch.setattr(cost, "QUARTER_TILES", True)  # off by default until measured
  k33 = masks.neighborhood((128, 128), 33)
  assert cost.backward_tile_shapes(k33, 128, 128) == ((16, 8), (16, 8))
  assert cost._live_quarter_count(k33, (16, 8), (16, 8)) == 6400
  assert cost._live_quarter_count(k33, (8, 16), (8, 16)) == 6912
  for spatial, kernel in [((32, 40), 11), ((56, 56), 7), ((96, 96), 17), ((40, 24), 9)]:
    mask = masks.neighborhood(spatial, kernel)
    base, pick = best_tile_shapes(mask, 128, 128), cost.backward_tile_shapes(mask, 128, 128)
    assert visited_blocks(mask, *pick)[0] <= visited_blocks(mask, *base)[0]
    assert cost._live_quarter_count(mask, *pick) <= cost._live_quarter_count(mask, *base)
  monkeypatch.setattr(cost, "QUARTER_TILES", False)
  assert cost.backward_tile_shapes(k33, 128, 128) == best_tile_shapes(k33, 128, 128)
  monkeypatch.setattr(cost, "QUARTER_TILES", True)
  plans = backend_cases.spy_backward_plans(monkeypatch)
  p = dict(problem=((24, 24), (5, 5), (1, 1), (1, 1), (False, False)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=3, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)
  small = masks.neighborhood((24, 24), 5)
  pick = cost.backward_tile_shapes(small, 128, 128)
  assert pick == ((4, 32), (4, 32)) != cost.auto_tiles(small, 128, 128)
  assert plans and all(x is not None and (x.q_layout.tile_shape, x.kv_layout.tile_shape) == pick
                       for x in plans)
  monkeypatch.undo()  # and no later test reuses a trace made under the knob
  ops._make_core.cache_clear()
  jax.clear_caches()


def test_picks():
  """backward=None: these kernels for 1-D maps (dense included); for neighborhoods by the
  window's keys and the width (`config.hopper_backward_neighborhood`): 1-D windows of >= 256
  keys; at 64 and 128 3-D windows of >= 1024 keys (strided ones included, their backward map
  blocks too), at 128 plain 2-D ones (no stride, dilation or causal dim) of >= 1024 keys,
  Triton's for other 2-D and shorter windows; at 48, 80 and 96 windows of >= 128 keys; at 32
  and for packed neighborhoods Triton's."""
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered
  seq = lambda m: make_plan(m, SequenceLayout(1000, 128), SequenceLayout(1000, 128))
  assert mgpu.picks_mosaic(seq(masks.causal()))
  assert mgpu.picks_mosaic(seq(masks.causal() & (masks.sliding_window(99) | masks.sink(4))))
  assert mgpu.picks_mosaic(seq(masks.full()))
  na = masks.neighborhood((32, 32), (7, 7))
  plan = gathered(make_plan(na, TiledLayout((32, 32), (1, 1), (8, 16)),
                            TiledLayout((32, 32), (1, 1), (8, 16))))
  assert not mgpu.picks_mosaic(plan)
  tiled = lambda m: gathered(make_plan(m, TiledLayout((8, 32, 32), m.dilation, (2, 4, 16)),
                                       TiledLayout((8, 32, 32), m.dilation, (2, 4, 16))))
  na3 = masks.neighborhood((8, 32, 32), (4, 16, 16))  # 1024 keys
  plan3 = tiled(na3)
  assert mgpu.picks_mosaic(plan3) and mgpu.picks_mosaic(plan3, 96) and mgpu.picks_mosaic(plan3, 64)
  assert not mgpu.picks_mosaic(plan3, 32)
  small3 = masks.neighborhood((8, 32, 32), (3, 7, 7))  # 147 keys
  assert not mgpu.picks_mosaic(tiled(small3)) and not mgpu.picks_mosaic(tiled(small3), 64)
  assert mgpu.picks_mosaic(tiled(small3), 96) and mgpu.picks_mosaic(tiled(small3), 40)
  assert not mgpu.picks_mosaic(plan, 96) and not mgpu.picks_mosaic(plan, 40)  # 49 keys
  na13 = masks.neighborhood((32, 32), (13, 13))  # 169 keys
  plan13 = gathered(make_plan(na13, TiledLayout((32, 32), (1, 1), (8, 16)),
                              TiledLayout((32, 32), (1, 1), (8, 16))))
  assert mgpu.picks_mosaic(plan13, 80) and mgpu.picks_mosaic(plan13, 48)
  assert not mgpu.picks_mosaic(plan13) and not mgpu.picks_mosaic(plan13, 64)
  na33 = masks.neighborhood((64, 64), (33, 33))  # 1089 keys: at 128 ours (no stride)
  plan33 = gathered(make_plan(na33, TiledLayout((64, 64), (1, 1), (8, 16)),
                              TiledLayout((64, 64), (1, 1), (8, 16))))
  assert mgpu.picks_mosaic(plan33) and not mgpu.picks_mosaic(plan33, 64)
  strided33 = masks.neighborhood((64, 64), (32, 32), (16, 16))
  plan_s = gathered(make_plan(strided33, TiledLayout((64, 64), (1, 1), (8, 16)),
                              TiledLayout((64, 64), (1, 1), (8, 16))))
  assert not mgpu.picks_mosaic(plan_s)
  for other in (masks.neighborhood((64, 96), (33, 33), dilation=(1, 2)),
                masks.neighborhood((64, 96), (33, 33), is_causal=(True, False))):
    layout = TiledLayout((64, 96), other.dilation, (8, 16))
    assert not mgpu.picks_mosaic(gathered(make_plan(other, layout, layout)))
  blocks = lambda mask, d, cfg=None: mgpu.default_backward_map_blocks(d, jnp.bfloat16, cfg, mask)
  strided = masks.neighborhood((8, 32, 32), (4, 16, 16), (2, 8, 8))
  assert mgpu.picks_mosaic(tiled(strided)) and blocks(strided, 128) == (128, 128)
  plan1 = lambda m: gathered(make_plan(m, TiledLayout((1000,), (2,), (128,)),
                                      TiledLayout((1000,), (2,), (128,))))
  na1 = masks.neighborhood((1000,), (257,), dilation=(2,))  # 1-D: windows of >= 256 keys
  assert mgpu.picks_mosaic(plan1(na1)) and blocks(na1, 128) == (128, 128)
  assert blocks(na1, 64) == (128, 128) and blocks(na1, 32) != (128, 128)
  short = masks.neighborhood((1000,), (129,), dilation=(2,))
  assert not mgpu.picks_mosaic(plan1(short)) and blocks(short, 128) != (128, 128)
  assert blocks(na3, 128) == (128, 128) and blocks(na, 128) != (128, 128)
  assert blocks(small3, 64) != (128, 128) and blocks(na3, 256) == (128, 64)  # role-split
  assert mgpu.picks_mosaic(plan, 256) and blocks(na, 256) == (128, 64)
  assert blocks(na3, 128, MosaicGPUConfig(backward="triton")) != (128, 128)
  assert blocks(na, 128, MosaicGPUConfig(backward="mosaic_gpu")) == (128, 128)
  packed = masks.packed_neighborhood([(16, 16), (8, 24)], 5)
  assert not mgpu.picks_mosaic(make_plan(packed, SequenceLayout(448, 128),
                                         SequenceLayout(448, 128)))  # neighborhoods, 1-D


@pytest.mark.parametrize("case", ["window_sink_segments", "function_d64", "na3d", "pingpong"])
def test_lowers_for_gpu(case):
  """Forward and backward lower to Mosaic GPU kernels and no Triton kernel: forward, dK/dV
  and dQ (pingpong: the backward's warpgroups alternating through a schedule barrier, dQ
  reduce-added, GQA, a causal window: two kernels)."""
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  seg = None
  config = None
  if case == "pingpong":
    mask = masks.causal() & masks.sliding_window(300)
    args = (S(1, 1000, 4, 128), S(1, 1000, 2, 128), S(1, 1000, 2, 128))
    config = MosaicGPUConfig(backward="mosaic_gpu", backward_pingpong=True)
  elif case == "window_sink_segments":
    mask = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
    args = (S(2, 2000, 8, 128), S(2, 2000, 2, 128), S(2, 2000, 2, 128))
    seg = jnp.asarray(np.repeat(np.arange(4), 500)[None].repeat(2, 0), jnp.int32)
  elif case == "function_d64":
    mask = masks.from_function(lambda q, k: (q >= k) & ((q - k) % 4 != 1))
    args = (S(1, 1000, 4, 64),) * 3
  if case == "na3d":
    f = lambda q, k, v: jsa.na3d(q, k, v, (4, 8, 8), stride=(2, 4, 4), backend="mosaic_gpu",
                                 config=BWD)
    args = (S(1, 8, 32, 32, 4, 128),) * 3
  else:
    f = lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg, backend="mosaic_gpu",
                                      config=config)
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), *args).mlir_module()
  # the forward and one backward launch: fused (ping-pong), or dQ's CTAs in the dK/dV launch;
  # strided neighborhoods' dQ on window-anchored KV boxes launches alone
  # (`attention_bwd.WINDOW_DQ`: other K/V arrays than the dK/dV kernel's)
  assert text.count("@mosaic_gpu_v2(") == (3 if case == "na3d" else 2)
  assert "__gpu$xla.gpu.triton" not in text


def test_p_smem(monkeypatch):
  """`attention_bwd.P_SMEM`: the fused form with Pᵀ through shared memory traces no wgmma
  with a register operand in the backward (the forward keeps its P V one), and lowers for
  CUDA (its 16 KB more shared memory fit). (Interpret mode always takes Pᵀ from shared
  memory: `test_attention`'s fused cases check those products.)"""
  import re
  from jax._src import mesh as mesh_lib
  from jax_sparse_attn import backends, ops
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  S = jax.ShapeDtypeStruct((1, 2048, 4, 128), jnp.bfloat16)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split")
  loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu",
                                               config=cfg).astype(jnp.float32))
  grad = jax.grad(loss, argnums=(0, 1, 2))
  device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                   platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)

  def register_operands():  # wgmmas whose A operand is a value: `acc[...] <- a[...] @ b...`
    with jax.sharding.use_abstract_mesh(mesh), backends.target("gpu"):
      text = str(jax.make_jaxpr(grad)(S, S, S))
    return len(re.findall(r"wgmma_ref \w+\[\.\.\.\] <- \w+\[\.\.\.\] @", text))

  default = register_operands()
  monkeypatch.setattr(attention_bwd, "P_SMEM", True)
  ops._make_core.cache_clear()  # retrace under the knob
  jax.clear_caches()
  assert register_operands() == 2 < default  # the forward's P V alone (full, masked steps)
  text = export_for_gpu(grad, S, S, S).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 2
  monkeypatch.undo()  # and no later test reuses a trace made under the knob
  ops._make_core.cache_clear()
  jax.clear_caches()


def test_work_items():
  """One item per KV block, in KV-block order (neighbouring KV blocks share Q blocks in L2),
  except Q lists longer than twice the mean (a sink's): those are cut into chunks of the mean
  (rounded up). KV blocks with empty lists get no item."""
  from pallas_kernels.gpu.mosaic_gpu.attention_bwd import _work_items
  items = _work_items(np.array([20, 2, 0, 3]))  # 20 > 2 * 8.3: chunks of 9
  assert items.tolist() == [[0, 0, 9], [0, 9, 9], [0, 18, 2], [1, 0, 2], [3, 0, 3]]
  items = _work_items(np.array([30, 6, 7, 5, 7]))  # mean 11: 30 cut into 11s, 6-7 whole
  assert items.tolist() == [[0, 0, 11], [0, 11, 11], [0, 22, 8], [1, 0, 6], [2, 0, 7],
                            [3, 0, 5], [4, 0, 7]]
  items = _work_items(np.array([6, 9, 12, 9, 0, 15]))  # 15 <= 2 * 10.2: whole lists
  assert items.tolist() == [[0, 0, 6], [1, 0, 9], [2, 0, 12], [3, 0, 9], [5, 0, 15]]
  assert _work_items(np.zeros(4, int)).shape == (0, 3)


def test_grid_orders_agree(monkeypatch):
  """The lab knobs that put work items (dK/dV) and Q blocks (dQ) on the grid's fastest axis
  give the default's gradients, bit for bit (the same items, in another order)."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, attention_bwd_dq
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 200, 2, 64)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((1, 200, 1, 64)), jnp.bfloat16) for _ in range(2))
  mask = masks.causal() & (masks.sliding_window(90) | masks.sink(3))
  loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, mask, backend="mosaic_gpu",
                                               interpret=True, config=BWD).astype(jnp.float32))
  grad = lambda: jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  want = grad()
  monkeypatch.setattr(attention_bwd, "ITEMS_FASTEST", not attention_bwd.ITEMS_FASTEST)
  monkeypatch.setattr(attention_bwd_dq, "Q_FASTEST", not attention_bwd_dq.Q_FASTEST)
  for g, w in zip(grad(), want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
  assert float(jnp.abs(want[1].astype(jnp.float32)).sum()) > 0


@pytest.mark.parametrize("mixed, head_dim, dq", [(True, 64, None), (False, 64, None),
                                                 (True, 128, "split")])
def test_sink_list_in_chunks(monkeypatch, mixed, head_dim, dq):
  """A sink's KV block is visited by every query block: its list runs as several items whose
  dK/dV add up (640 tokens: 5 blocks, the first visited 5 times, the rest about twice; items
  of the mean list length, 3 entries).
  ``mixed`` (`attention_bwd.MIXED_DKV`): only the cut block's items reduce-add (into its own
  float32 buffer), the others store dK/dV; with dQ fused into the kernel too."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  monkeypatch.setattr(attention_bwd, "MIXED_DKV", mixed)
  p = dict(batch=1, sq=640, skv=640, heads=2, kv_heads=1, head_dim=head_dim,
           mask="window_sink", segments=False, dtype=jnp.bfloat16, seed=3)
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640), SequenceLayout(640, 128),
                   SequenceLayout(640, 128))
  items = attention_bwd._work_items(plan.block_map.q_counts)
  assert np.sum(items[:, 0] == 0) == 2
  slots, cut_blocks = attention_bwd._cut_slots(items)
  assert cut_blocks.tolist() == [0] and slots.tolist() == [0, 0] + [-1] * (len(items) - 2)
  config = MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=config)
  if mixed:  # it lowers for CUDA: the forward and both backward kernels in one launch
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jsa.attention(
        q, k, v, masks.causal() & (masks.sliding_window(255) | masks.sink(4)),
        backend="mosaic_gpu", config=BWD).astype(jnp.float32))
    text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 2048, 4, 128),
                          S(1, 2048, 2, 128), S(1, 2048, 2, 128)).mlir_module()
    assert text.count("@mosaic_gpu_v2(") == 2


def test_quarters(monkeypatch):
  """`attention_bwd.QUARTERS`: a dK/dV warpgroup skips the partial steps whose 64 queries
  none of its 64 keys may see (the sink block's second half seen from far queries, the causal
  diagonal's corner): gradients vs the brute force, GQA; the map has such
  quarters, and the kernel lowers with them."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, tables
  monkeypatch.setattr(attention_bwd, "QUARTERS", True)
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640), SequenceLayout(640, 128),
                   SequenceLayout(640, 128))
  _, bits = tables.live_quarters(plan)
  visited = np.arange(bits.shape[1])[None] < np.asarray(plan.block_map.q_counts)[:, None]
  assert np.any(visited & (bits != 15))  # some visited block has a dead quarter
  def share(mask, s):
    plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
    return attention_bwd._dead_share(plan.block_map, tables.live_quarters(plan)[1])
  lm = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
  assert share(lm, 8192) > attention_bwd.QUARTERS_MIN_DEAD  # "auto" skips there
  window = masks.causal() & masks.sliding_window(2047)
  assert share(window, 32768) < attention_bwd.QUARTERS_MIN_DEAD  # every step runs there
  p = dict(batch=1, sq=640, skv=640, heads=2, kv_heads=1, head_dim=64, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=5)  # (segment ids: a runtime map)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                config=MosaicGPUConfig(backward="mosaic_gpu"))
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, masks.causal() & (masks.sliding_window(255) | masks.sink(4)),
      backend="mosaic_gpu", config=BWD).astype(jnp.float32))
  export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 2048, 4, 128), S(1, 2048, 2, 128),
                 S(1, 2048, 2, 128)).mlir_module()


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


def test_quarters_dq(monkeypatch):
  """`attention_bwd.QUARTERS_DQ`: the dQ kernel's warpgroups skip the 64-key halves of
  partial blocks that none of their 64 queries may see (the joint launch and dQ's own):
  gradients vs the brute force, GQA; the map has such halves; the kernels lower."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, tables
  monkeypatch.setattr(attention_bwd, "QUARTERS", True)
  monkeypatch.setattr(attention_bwd, "QUARTERS_DQ", True)
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640), SequenceLayout(640, 128),
                   SequenceLayout(640, 128))
  bits, _ = tables.live_quarters(plan)
  visited = np.arange(bits.shape[1])[None] < np.asarray(plan.block_map.kv_counts)[:, None]
  assert np.any(visited & (bits != 15))
  p = dict(batch=1, sq=640, skv=640, heads=4, kv_heads=2, head_dim=64, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=8)
  for joint in (True, False):
    monkeypatch.setattr(attention_bwd, "JOINT_DQ", joint)
    backend_cases.check_attention(p, "mosaic_gpu", interpret=True,
                                  config=MosaicGPUConfig(backward="mosaic_gpu"))
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, masks.causal() & (masks.sliding_window(255) | masks.sink(4)),
      backend="mosaic_gpu", config=BWD).astype(jnp.float32))
  export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 2048, 4, 128), S(1, 2048, 2, 128),
                 S(1, 2048, 2, 128)).mlir_module()


@pytest.mark.parametrize("head_dim", [64, 80])
def test_rejects_split_dq_below_128(head_dim):
  """"split" shares dQ's 128 columns between the warpgroups: not at 64 or 96 columns."""
  x = jnp.ones((1, 128, 2, head_dim), jnp.bfloat16)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split")
  loss = lambda x: jnp.sum(jsa.attention(x, x, x, masks.causal(), backend="mosaic_gpu",
                                         interpret=True, config=cfg).astype(jnp.float32))
  with pytest.raises(ValueError, match="backward_dq='split' needs a head_dim padded to 128"):
    jax.grad(loss)(x)


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


@pytest.mark.parametrize("written", [True, False])
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
  at least `FUSED_MIN_ENTRIES` Q blocks on average (dense S=8192: 64, causal: 32.5) and the
  map has no dead quarters for the dK/dV kernel to skip (a 3-D neighborhood with 11%), else
  dQ is its own kernel (causal S=4096: 16.5; head_dim 64); explicit forms win. The fused
  dense backward lowers to one kernel beside the forward."""
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd, tables
  seq = lambda m, s: make_plan(m, SequenceLayout(s, 128), SequenceLayout(s, 128))
  dense, causal = seq(masks.full(), 8192), seq(masks.causal(), 8192)
  cfg = lambda dq=None: mgpu.config._config(MosaicGPUConfig(backward="mosaic_gpu",
                                                            backward_dq=dq))
  assert attention_bwd._mean_entries(dense.block_map) == 64
  assert not attention_bwd._separate_dq(cfg(), dense, 128)
  assert attention_bwd._separate_dq(cfg(), dense, 64)
  assert not attention_bwd._separate_dq(cfg(), causal, 128)  # 32.5
  assert attention_bwd._separate_dq(cfg(), seq(masks.causal(), 4096), 128)  # 16.5
  assert attention_bwd._separate_dq(cfg("kernel"), dense, 128)
  assert not attention_bwd._separate_dq(cfg("split"), causal, 128)
  tile = TiledLayout((16, 32, 32), (1, 1, 1), (2, 4, 16))
  na3 = gathered(make_plan(masks.neighborhood((16, 32, 32), (8, 16, 16)), tile, tile))
  share = attention_bwd._dead_share(na3.block_map, tables.live_quarters(na3)[1])
  assert attention_bwd._mean_entries(na3.block_map) >= attention_bwd.FUSED_MIN_ENTRIES
  assert share >= attention_bwd.QUARTERS_MIN_DEAD and attention_bwd._separate_dq(cfg(), na3, 128)
  monkeypatch.setattr(attention_bwd, "QUARTERS", False)  # no skips: fused
  assert not attention_bwd._separate_dq(cfg(), na3, 128)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  f = lambda q, k, v: jsa.attention(q, k, v, masks.full(), backend="mosaic_gpu",
                                    config=MosaicGPUConfig(backward="mosaic_gpu"))
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 8192, 2, 128),
                        S(1, 8192, 2, 128), S(1, 8192, 2, 128)).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 2


@pytest.mark.parametrize("case", ["sinks", "gqa_batch", "documents"])
def test_joint_dq(monkeypatch, case):
  """`attention_bwd.JOINT_DQ`: dQ's CTAs after the dK/dV work items in one launch give the
  gradients of two launches, bit for bit (interpret mode runs the grid in order): a sink's
  list cut into several items (mixed dK/dV stores and float32 buffers), GQA with batch 2
  (the program id's decode into item, head and batch; dK/dV written as outputs) and
  documents (a runtime map over the static items); and against the float64 brute force.
  One launch for both backward kernels on CUDA."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  mask = {"sinks": "window_sink", "gqa_batch": "causal", "documents": "window_sink"}[case]
  p = dict(batch=2 if case == "gqa_batch" else 1, sq=400 if case == "gqa_batch" else 640,
           skv=400 if case == "gqa_batch" else 640, heads=4, kv_heads=2, head_dim=64,
           mask=mask, segments=case == "documents", dtype=jnp.bfloat16, seed=7)
  config = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel")
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  m = backend_cases.seq_mask(mask, p["sq"], p["skv"])
  seg = (jnp.asarray(np.repeat(np.arange(4), 160)[None], jnp.int32)
         if case == "documents" else None)
  loss = lambda q, k, v: jnp.sum(jsa.attention(
      q, k, v, m, segment_ids=seg, backend="mosaic_gpu", interpret=True,
      config=config).astype(jnp.float32) * d_out.astype(jnp.float32))
  grads = {}
  for joint in (True, False):
    monkeypatch.setattr(attention_bwd, "JOINT_DQ", joint)
    jax.clear_caches()
    grads[joint] = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grads[True], grads[False]):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  dense = np.asarray(m(np.arange(p["sq"])[:, None], np.arange(p["skv"])[None, :]))
  want = brute_force.attention_grads(q, k, v, dense, 1.0 / math.sqrt(p["head_dim"]), d_out,
                                     seg, seg)
  tol = backend_cases.TOL[jnp.bfloat16]
  for name, got, ref in zip("qkv", grads[True], want):
    err = brute_force.rel_err(got, ref)
    assert err < tol * 2 or backend_cases._small(got, ref, tol), (name, err)
  monkeypatch.setattr(attention_bwd, "JOINT_DQ", True)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  cuda = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu",
                                               config=config).astype(jnp.float32))
  text = export_for_gpu(jax.grad(cuda, argnums=(0, 1, 2)), S(2, 1000, 4, 64),
                        S(2, 1000, 2, 64), S(2, 1000, 2, 64)).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 2
