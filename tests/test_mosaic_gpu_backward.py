"""The Hopper backward (Pallas Mosaic GPU, `attention_bwd`) in GPU interpret mode (CPU) vs the
float64 brute force: every 1-D mask (unions with sinks, `from_function`, rows that see
nothing), segment ids, GQA, odd lengths, head dims 32-128 (padded), bf16 and fp16, every dQ
form (its own kernel, or reduce-added "split" / "own"); neighborhoods (stride, dilation,
causal dims) with the Mosaic GPU backward asked for; CUDA lowering on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_cases
from strategies import examples
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
@given(p=backend_cases.seq_problems(max_len=160, dtypes=(jnp.bfloat16, jnp.float16)),
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
  from pallas_kernels.gpu.mosaic_gpu import work_items
  plan = make_plan(backend_cases.seq_mask("window_sink", 640, 640),
                   SequenceLayout(640, 128), SequenceLayout(640, 64))
  items = work_items.static_items(plan.block_map.q_counts)
  assert np.sum(items[:, 0] == 0) > 1 and len(np.unique(items[:, 0])) < len(items)
  p = dict(batch=1, sq=640, skv=640, heads=1, kv_heads=1, head_dim=256, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=9)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)


@pytest.mark.parametrize("segments, head_dim", [(False, 64), (True, 128)])
def test_array_of_several_runs(segments, head_dim):
  """A `from_array` mask with rows of up to 3 runs (a union of row bounds, tested as
  intervals per term) forward and backward on the Hopper kernels, which lower to CUDA without
  a Triton kernel."""
  mask = backend_cases.seq_mask("array_runs", 300, 300)
  assert isinstance(mask, masks.Or) and len(masks.interval_terms(mask)) == 3
  p = dict(batch=1, sq=300, skv=300, heads=4, kv_heads=2, head_dim=head_dim, mask="array_runs",
           segments=segments, dtype=jnp.bfloat16, seed=13)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)
  S = jax.ShapeDtypeStruct((1, 300, 4, head_dim), jnp.bfloat16)
  train = jax.grad(lambda q, k, v: jnp.sum(jsa.attention(q, k, v, mask, backend="mosaic_gpu")
                                           .astype(jnp.float32)), argnums=(0, 1, 2))
  text = export_for_gpu(train, S, S, S).mlir_module()  # CUDA lowering: no Triton kernel
  assert text.count("@mosaic_gpu_v2(") >= 2 and "__gpu$xla.gpu.triton" not in text


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
  heads = 4 if (mask, dq) == ("window_sink", None) else 2  # one 4-head group is enough
  p = dict(batch=1, sq=200, skv=200, heads=heads,
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


@settings(max_examples=examples(3), deadline=None)
@given(p=backend_cases.na_problems(dtypes=(jnp.bfloat16, jnp.float16)))
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
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  built = backend_cases.spy(monkeypatch, attention_bwd, "backward_mma_inputs",
                            lambda a, kw, tables: tables)
  p = dict(problem=problem, batch=1, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
           seed=1, tile_q=tile, tile_kv=tile)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD)
  assert built and all(x is not None for x in built)


def test_picks():
  """backward=None: these kernels for 1-D maps (dense included); for neighborhoods by the
  window's keys and the width (`config.hopper_backward_neighborhood`): 1-D windows of >= 256
  keys; at 64 and 128 3-D windows of >= 1024 keys (strided ones included, their backward map
  blocks too) and unstrided 2-D ones (dilation and causal dims allowed) of >= 1024 keys,
  Triton's for strided 2-D and shorter windows; at 48, 80 and 96 windows of >= 128 keys; at
  32 and for packed neighborhoods Triton's."""
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
  assert mgpu.picks_mosaic(plan33) and mgpu.picks_mosaic(plan33, 64)
  strided33 = masks.neighborhood((64, 64), (32, 32), (16, 16))
  plan_s = gathered(make_plan(strided33, TiledLayout((64, 64), (1, 1), (8, 16)),
                              TiledLayout((64, 64), (1, 1), (8, 16))))
  assert not mgpu.picks_mosaic(plan_s)
  for other in (masks.neighborhood((64, 96), (33, 33), dilation=(1, 2)),
                masks.neighborhood((64, 96), (33, 33), is_causal=(True, False))):
    layout = TiledLayout((64, 96), other.dilation, (8, 16))
    assert mgpu.picks_mosaic(gathered(make_plan(other, layout, layout)))
  dil17 = masks.neighborhood((96, 96), (17, 17), dilation=(4, 4))  # 289 keys: Triton's
  layout = TiledLayout((96, 96), dil17.dilation, (8, 16))
  assert not mgpu.picks_mosaic(gathered(make_plan(dil17, layout, layout)))
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


@pytest.mark.parametrize("head_dim", [64, 80])
def test_rejects_split_dq_below_128(head_dim):
  """"split" shares dQ's 128 columns between the warpgroups: not at 64 or 96 columns."""
  x = jnp.ones((1, 128, 2, head_dim), jnp.bfloat16)
  cfg = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split")
  loss = lambda x: jnp.sum(jsa.attention(x, x, x, masks.causal(), backend="mosaic_gpu",
                                         interpret=True, config=cfg).astype(jnp.float32))
  with pytest.raises(ValueError, match="backward_dq='split' needs a head_dim padded to 128"):
    jax.grad(loss)(x)


