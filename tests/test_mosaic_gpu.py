"""The Hopper forward (Pallas Mosaic GPU) in GPU interpret mode (CPU) vs the float64 brute
force; gradients run the backward `MosaicGPUConfig.backward=None` picks (the Mosaic GPU
backward for 1-D masks, the Triton kernels for neighborhoods; test_mosaic_gpu_backward.py
tests the Mosaic GPU backward on every mask)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_cases
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn.layout import TiledLayout
from jax_sparse_attn.plan import gathered, make_plan
from jax_sparse_attn import masks
from pallas_kernels.gpu import MosaicGPUConfig, export_for_gpu
from pallas_kernels.gpu import mosaic_gpu as mgpu
from pallas_kernels.gpu.mosaic_gpu import boxes as mg_boxes
from pallas_kernels.gpu.mosaic_gpu import cost as mg_cost
from pallas_kernels.gpu.mosaic_gpu import schedule as mg_schedule
from pallas_kernels.gpu.mosaic_gpu import tables as mg_tables


@st.composite
def na_problems(draw):
  """Small grids whose Q blocks are 128-token tiles (64 rows per compute warpgroup) and KV
  blocks 64-token tiles, with odd sizes (TMA out-of-bounds edges)."""
  ndim = draw(st.sampled_from([1, 2, 3]))
  if ndim == 1:
    spatial = (draw(st.integers(70, 300)),)
    tile_q, tile_kv = (128,), (64,)
  elif ndim == 2:
    spatial = (draw(st.integers(5, 20)), draw(st.integers(9, 24)))
    tile_q, tile_kv = draw(st.sampled_from([((8, 16), (8, 8)), ((16, 8), (8, 8)),
                                            ((4, 32), (4, 16)), ((8, 16), (4, 16))]))
  else:
    spatial = (draw(st.integers(1, 4)), draw(st.integers(5, 12)), draw(st.integers(8, 12)))
    tile_q, tile_kv = draw(st.sampled_from([((2, 8, 8), (1, 8, 8)), ((1, 16, 8), (1, 8, 8)),
                                            ((2, 4, 16), (2, 4, 8))]))
  kernel = tuple(draw(st.integers(1, max(1, min(s, 9)))) for s in spatial)
  stride = tuple(draw(st.integers(1, k)) for k in kernel)
  dilation = tuple(draw(st.sampled_from([1, 1, 2])) if s >= 2 * k else 1
                   for s, k in zip(spatial, kernel))
  causal = tuple(draw(st.booleans()) for _ in spatial)
  kv_heads = draw(st.sampled_from([1, 2]))
  return dict(problem=(spatial, kernel, stride, dilation, causal), batch=1,
              heads=kv_heads * draw(st.sampled_from([1, 2])), kv_heads=kv_heads,
              head_dim=draw(st.sampled_from([32, 64])),
              dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float16])),
              seed=draw(st.integers(0, 2**16)), tile_q=tile_q, tile_kv=tile_kv)


@settings(max_examples=examples(3), deadline=None)
@given(p=na_problems(), mask_mma=st.booleans(), kv_windows=st.sampled_from([None, True]))
def test_na(p, mask_mma, kv_windows):
  backend_cases.check_na(p, "mosaic_gpu", interpret=True,
                         config=MosaicGPUConfig(mask_mma=mask_mma, kv_windows=kv_windows))


def test_mma_masks_where_narrow():
  """MMA-bias tables for 2-D/3-D tiles with <= 32 one-hot columns; 1-D and wide tiles use
  the element test. The one-hot has one 1 per (column dim) in each row."""
  mask = masks.neighborhood((32, 32), (7, 7))
  plan = gathered(make_plan(mask, TiledLayout((32, 32), (1, 1), (8, 16)),
                            TiledLayout((32, 32), (1, 1), (8, 8))))
  onehot, tables, ids = mg_tables._mma_inputs(plan, 0.125)
  assert onehot.shape == (128, 32) and tables.shape[1:] == (32, 64)
  np.testing.assert_array_equal(np.asarray(onehot, np.float32).sum(1), 2)
  assert ids.shape == plan.block_map.kv_ids.shape
  wide = gathered(make_plan(mask, TiledLayout((32, 32), (1, 1), (2, 64)),
                            TiledLayout((32, 32), (1, 1), (8, 8))))
  assert mg_tables._mma_inputs(wide, 0.125) is None  # 2 + 64 columns
  seq = make_plan(masks.causal(), jsa.layout.SequenceLayout(300, 128),
                  jsa.layout.SequenceLayout(300, 64))
  assert mg_tables._mma_inputs(seq, 0.125) is None


@pytest.mark.parametrize("mask, sq, skv", [("causal", 200, 200), ("masked_rows", 150, 150),
                                           ("causal_window", 131, 131), ("full", 100, 260),
                                           ("block_local", 70, 70), ("array_rows", 170, 300)])
def test_attention(mask, sq, skv):
  """The default path (Hopper forward, the backward `picks_mosaic` chooses) on fixed 1-D
  masks, GQA 4/2; batch rows and every dQ form: `test_mosaic_gpu_backward`."""
  p = dict(batch=1, sq=sq, skv=skv, heads=4, kv_heads=2, head_dim=64, mask=mask,
           segments=False, dtype=jnp.bfloat16, seed=sq + skv)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)


@pytest.mark.parametrize("mask, head_dim, segments", [
    pytest.param("causal", 256, False, marks=pytest.mark.extended),  # 256 columns: the 200 case
    ("window_sink", 200, True), ("causal_window", 160, False)])
def test_head_dim_256(mask, head_dim, segments):
  """head_dim 129-256 (run at 160, 192 or 256 columns): the forward on 64-key blocks,
  the backward on the role-split Hopper kernels (`attention_bwd_wide`; no Triton call); `auto`
  picks it there, neighborhoods included (measured)."""
  from pallas_kernels.gpu.mosaic_gpu import config as mg_config
  pick = lambda m, d: mg_config.supports(m, jnp.bfloat16, d, False, None, None, None, None)
  assert pick(masks.causal(), 256) and pick(masks.causal(), 160)
  assert not pick(masks.causal(), 257) and pick(masks.causal(), 32) and pick(masks.causal(), 8)
  assert pick(masks.neighborhood((16, 16), 5), 128)
  assert pick(masks.neighborhood((16, 16), 5), 256) and pick(masks.neighborhood(16, 5), 192)
  cols = 160 if head_dim <= 160 else 192 if head_dim <= 192 else 256
  assert [mg_config._padded_head_dim(d) for d in (129, 160, 161, 192, 193, 256)] == [
      160, 160, 192, 192, 256, 256]
  p = dict(batch=1, sq=200, skv=200, heads=2, kv_heads=1, head_dim=head_dim, mask=mask,
           segments=segments, dtype=jnp.bfloat16, seed=head_dim)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu")
                                 .astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S(1, 1000, 4, head_dim),
                        S(1, 1000, 2, head_dim), S(1, 1000, 2, head_dim)).mlir_module()
  assert text.count("@mosaic_gpu_v2(") == 3 and "__gpu$xla.gpu.triton" not in text
  # The kernels take the columns they run at: 160 at 160 (32-column groups), 200 at 256.
  assert f"x{cols}xbf16>" in text and (cols == 256 or "x256xbf16>" not in text)
  assert cols == 192 or "x192xbf16>" not in text
  with pytest.raises(ValueError, match=f"block_kv 128 with head_dim {head_dim}"):
    x = jnp.ones((1, 128, 2, head_dim), jnp.bfloat16)
    jsa.attention(x, x, x, backend="mosaic_gpu", block_kv=128, interpret=True)


@pytest.mark.parametrize("head_dim, cols", [  # extended: the same swizzle groups again
    (90, 96), pytest.param(24, 32, marks=pytest.mark.extended), (72, 80),
    pytest.param(40, 48, marks=pytest.mark.extended)])
def test_narrow_head_dims(head_dim, cols):
  """head_dim 81-96 runs at 96 columns and up to 32 at 32 (64-byte swizzle groups of 32
  columns), 65-80 at 80 and 33-48 at 48 (32-byte groups of 16), forward and backward:
  correct in interpret mode padded to those columns, and every kernel lowers with them for
  1-D masks and for neighborhoods (box copies, MMA bias, strided on the shifted key grid),
  with no Triton call (`auto`'s backward for neighborhoods of >= 128 keys at 33-96; forced at
  32, where `auto` keeps Triton's for neighborhoods)."""
  from pallas_kernels.gpu.mosaic_gpu import config as mg_config
  widths = [mg_config._padded_head_dim(d) for d in (8, 32, 33, 48, 49, 64, 65, 80, 81, 96, 97)]
  assert widths == [32, 32, 48, 48, 64, 64, 80, 80, 96, 96, 128]
  assert [mg_config.swizzle_columns(d) for d in (32, 48, 64, 80, 96, 128, 160, 192, 256)] == [
      32, 16, 64, 16, 32, 64, 32, 64, 64]
  # 2-D neighborhoods of >= 128 keys train on the Hopper backward at 48, 80 and 96 columns
  # (Triton's at 32, 64 and 128, and for shorter windows: measured).
  na2d = masks.neighborhood((16, 16), 13)
  assert mg_config.hopper_backward_neighborhood(na2d, 80)
  assert mg_config.hopper_backward_neighborhood(na2d, 70)
  assert mg_config.hopper_backward_neighborhood(na2d, 40)
  assert not mg_config.hopper_backward_neighborhood(na2d, 128)
  assert not mg_config.hopper_backward_neighborhood(na2d, 64)
  assert not mg_config.hopper_backward_neighborhood(na2d, 32)
  assert not mg_config.hopper_backward_neighborhood(masks.neighborhood((16, 16), 7), 80)
  k33 = masks.neighborhood((64, 64), 33, dilation=(1, 1), is_causal=(True, False))
  assert all(mg_config.hopper_backward_neighborhood(k33, d) for d in (64, 128))
  # 3-D windows from 256 keys at 64 columns, from 1024 at 128 (measured on each side).
  k4x9, k3x7 = (masks.neighborhood((8, 32, 32), k) for k in ((4, 9, 9), (3, 7, 7)))
  assert mg_config.hopper_backward_neighborhood(k4x9, 64)
  assert not mg_config.hopper_backward_neighborhood(k4x9, 128)
  assert not mg_config.hopper_backward_neighborhood(k3x7, 64)
  p = dict(batch=1, sq=150, skv=150, heads=2, kv_heads=1, head_dim=head_dim,
           mask="causal_window", segments=False, dtype=jnp.bfloat16, seed=head_dim)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  na_cfg = None if cols in (48, 80, 96) else MosaicGPUConfig(backward="mosaic_gpu")
  cases = [
      (lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu"), (1000,)),
      (lambda q, k, v: jsa.na3d(q, k, v, (4, 8, 8), backend="mosaic_gpu", config=na_cfg),
       (8, 32, 32))]
  if cols in (48, 80):  # float32 dK/dV staging at 16-column tiles (`config.swizzled_f32`)
    cases.append((lambda q, k, v: jsa.na3d(q, k, v, (4, 8, 8), stride=(2, 4, 4),
                                           backend="mosaic_gpu", config=na_cfg), (8, 32, 32)))
  if cols in (48, 80, 96):  # `auto`'s 2-D backward there
    cases.append((lambda q, k, v: jsa.na2d(q, k, v, (13, 13), backend="mosaic_gpu"), (64, 64)))
  for fn, spatial in cases:
    loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))
    x = S(1, *spatial, 2, head_dim)
    text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), x, x, x).mlir_module()
    # the forward and one backward launch (dQ in the dK/dV launch, `attention_bwd.JOINT_DQ`)
    assert text.count("@mosaic_gpu_v2(") == 2 and "__gpu$xla.gpu.triton" not in text
    assert f"x{cols}xbf16>" in text
    assert len(spatial) > 1 or "x128xbf16>" not in text and "x64xbf16>" not in text


@pytest.mark.parametrize("form", ["each", "and"])
def test_element_test_forms(monkeypatch, form):
  """Both ways of applying the element tests (`attention_fwd.TEST_FORM`) on a union with a
  sink (a mask function), segment ids and GQA."""
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd
  monkeypatch.setattr(attention_fwd, "TEST_FORM", form)
  p = dict(batch=1, sq=260, skv=260, heads=2, kv_heads=1, head_dim=64, mask="window_sink",
           segments=True, dtype=jnp.bfloat16, seed=21)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True)


def test_schedules_agree():
  """Every scheduling (one program per work item, persistent programs looping over several
  items, numbered or longest-first order) computes each item the
  same way: outputs and lse are bit-identical to the default, which test_attention checks
  against the brute force. Causal rows have different lengths, so the orders differ."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 333, 2, 64)), jnp.bfloat16) for _ in range(3))
  run = lambda cfg, **kw: jax.jit(lambda q, k, v: jsa.attention(
      q, k, v, masks.causal(), backend="mosaic_gpu", interpret=True, return_lse=True,
      config=cfg, **kw))(q, k, v)
  want = run(None)
  for cfg, kw in [(MosaicGPUConfig(persistent=False, longest_first=False), {}),
                  (MosaicGPUConfig(programs=5, longest_first=False), {}),
                  (MosaicGPUConfig(programs=2), dict(block_kv=128))]:
    got = run(cfg, **kw)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                    err_msg=str(cfg))


def test_order_is_longest_first_and_stable():
  counts = np.array([3, 5, 5, 1, 5, 0])
  np.testing.assert_array_equal(mg_schedule._order(counts, True), [1, 2, 4, 0, 3, 5])
  np.testing.assert_array_equal(mg_schedule._order(jnp.asarray(counts), True), [1, 2, 4, 0, 3, 5])
  np.testing.assert_array_equal(mg_schedule._order(counts, False), np.arange(6))


def test_persistent_where_rows_are_even_or_short():
  assert mg_schedule._persistent_default(np.full(40, 15))  # 2-D NA interior, dense
  assert mg_schedule._persistent_default(np.minimum(np.arange(1, 257), 17))  # sliding window
  assert mg_schedule._persistent_default(np.array([4, 6, 8, 8, 8]))  # short rows
  assert not mg_schedule._persistent_default(np.arange(1, 129))  # causal
  assert not mg_schedule._persistent_default(np.array([16, 30, 45, 30, 16, 24]))  # 3-D borders
  assert not mg_schedule._persistent_default(jnp.full(40, 15))  # known at run time only


@pytest.mark.parametrize("hopper, kwargs, want", [
    (True, {}, "mosaic_gpu"),
    (False, {}, "triton"),
    (True, dict(dtype=jnp.float32), "triton"),
    (True, dict(head_dim=256), "mosaic_gpu"),  # the forward 2.7x Triton's (H200)
    (True, dict(head_dim=256, mask=masks.neighborhood((16, 16), 5)), "mosaic_gpu"),
    (True, dict(head_dim=264), "triton"),
    (True, dict(head_dim=32), "mosaic_gpu"),  # at 32 columns (padded to 64 it lost)
    (True, dict(head_dim=16), "mosaic_gpu"),
    (True, dict(head_dim=48), "mosaic_gpu"),
    (True, dict(segments=True), "mosaic_gpu"),
    (True, dict(mask=masks.neighborhood((16, 16), 5)), "mosaic_gpu"),
    # padding masks / segment ids on a neighborhood: Triton (faster on the H200)
    (True, dict(mask=masks.neighborhood((16, 16), 5), segments=True), "triton"),
    (True, dict(mask=masks.from_function(lambda q, k: q >= k)), "mosaic_gpu"),
    (True, dict(mask=masks.causal() & (masks.sliding_window(511) | masks.sink(4))), "mosaic_gpu"),
    (True, dict(block_q=64), "triton"),
    (True, dict(block_kv=128), "mosaic_gpu"),
    (True, dict(config=MosaicGPUConfig(stages=3)), "mosaic_gpu"),
    (True, dict(config="triton-config"), "triton"),
    (True, dict(mask=masks.from_array(np.tile([1, 0], (4, 5)).astype(bool))), "xla"),  # 5 runs
    (True, dict(mask=masks.from_array(np.array([[1, 0, 1, 1]] * 4, bool))), "mosaic_gpu"),
    (False, dict(mask=masks.from_array(np.array([[1, 0, 1, 1]] * 4, bool))), "triton"),
    (True, dict(mask=masks.from_array(np.tril(np.ones((4, 4), bool)))), "mosaic_gpu"),
    (False, dict(mask=masks.from_array(np.tril(np.ones((4, 4), bool)))), "triton"),
])
def test_auto_backend_on_gpus(monkeypatch, hopper, kwargs, want):
  """backend="auto" on a GPU: mosaic_gpu on Hopper where it supports the call, else triton."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(mgpu, "is_hopper", lambda: hopper)
  args = dict(mask=masks.causal(), dtype=jnp.bfloat16, head_dim=128)
  args.update(kwargs)
  assert jsa.resolve_backend("auto", args.pop("mask"), **args) == want


@pytest.mark.parametrize("block_kv, stages", [(128, 2), (64, 3)])
def test_head_dim_128(block_kv, stages):
  """With 128-token KV blocks the unfused form has room for one Q buffer only: 3 programs
  over 6 work items reuse it."""
  if block_kv == 128:
    assert mg_schedule._smem_bytes(128, 128, stages, 2, False, q_bufs=2) > mg_schedule._SMEM_LIMIT
  p = dict(batch=1, sq=300, skv=300, heads=2, kv_heads=1, head_dim=128, mask="window",
           segments=False, dtype=jnp.float16, seed=block_kv + stages)
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, block_kv=block_kv,
                                config=MosaicGPUConfig(stages=stages))


def test_tiles_are_boxes_or_permuted():
  """Gathered plans read TMA boxes of the caller's layout when every tile row is a multiple
  of 8 tokens and the tiles divide the leading spatial dims; dilation, narrow tiles or
  ragged leading dims fall back to a permuted copy (checked by test_na)."""
  mask = masks.neighborhood((32, 32), (7, 7))
  box = gathered(make_plan(mask, TiledLayout((32, 32), (1, 1), (8, 16)),
                           TiledLayout((32, 32), (1, 1), (8, 8))))
  assert mg_boxes._box_layout(box.q_layout) and mg_boxes._box_layout(box.kv_layout)
  assert not mg_boxes._box_layout(TiledLayout((32, 32), (1, 1), (32, 4)))
  assert not mg_boxes._box_layout(TiledLayout((32, 32), (2, 1), (8, 16)))
  assert not mg_boxes._box_layout(TiledLayout((32, 30), (1, 1), (8, 16)))  # 30 % 8
  # A tile whose 64-row half would be narrower than 8 tokens: (2, 64) -> (1, 64) is fine,
  # (16, 8) -> (8, 8) is fine, (128, 1) is not.
  assert mg_boxes._box_layout(TiledLayout((32, 128), (1, 1), (2, 64)))
  assert not mg_boxes._box_layout(TiledLayout((256, 4), (1, 1), (128, 1)))
  # Only the last dim may end in a partial tile (a real TMA dim, clipped); a row past the
  # end of a leading dim would be stored into the next batch or leading index.
  assert mg_boxes._box_layout(TiledLayout((32, 40), (1, 1), (8, 16)))  # 40 % 16: last dim
  assert not mg_boxes._box_layout(TiledLayout((100, 96), (1, 1), (16, 8)))  # 100 % 16
  assert not mg_boxes._box_layout(TiledLayout((9, 22, 24), (1, 1, 1), (2, 8, 8)))
  assert not mg_boxes._box_layout(TiledLayout((9, 24, 24), (1, 1, 1), (2, 4, 8)))  # 9 % 2
  assert mg_boxes._box_layout(TiledLayout((8, 24, 24), (1, 1, 1), (4, 4, 8)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.float32), "dtype float32"),
    (dict(head_dim=320), "head_dim 320 .at most 256"),
    (dict(config=MosaicGPUConfig(backward="cudnn")), "backward must be 'mosaic_gpu', 'triton'"),
    (dict(config=MosaicGPUConfig(backward_dq="half")),
     "backward_dq must be 'split', 'own', 'kernel'"),
    (dict(block_q=64), "block_q 64"),
    (dict(block_kv=32), "block_kv 32"),
    (dict(scale=-0.125), "scale -0.125 .must be positive"),
    (dict(config=MosaicGPUConfig(triton="fast")), "triton must be a TritonConfig"),
    (dict(config="fast"), "must be a MosaicGPUConfig"),
    (dict(config=MosaicGPUConfig(stages=1)), "stages must be >= 2"),
    (dict(config=MosaicGPUConfig(programs=0)), "programs must be >= 1"),
    (dict(config=MosaicGPUConfig(split="yes")), "split must be True, False or None"),
    (dict(config=MosaicGPUConfig(persistent=1)), "persistent must be True, False or None"),
    (dict(config=MosaicGPUConfig(box_copies="on")), "box_copies must be True, False or None"),
    (dict(config=MosaicGPUConfig(kv_windows=1)), "kv_windows must be True, False or None"),
    (dict(head_dim=128, block_kv=128, config=MosaicGPUConfig(stages=3)),
     "stages=3 needs .* bytes of shared memory"),
    # The unfused P·V form keeps P in shared memory too: 5 stages of 64 fit only without it.
    (dict(head_dim=128, block_kv=64, config=MosaicGPUConfig(stages=5, fused_pv=False)),
     "stages=5 needs .* bytes of shared memory"),
])
def test_rejects(kwargs, match):
  dtype = kwargs.pop("dtype", jnp.bfloat16)
  d = kwargs.pop("head_dim", 64)
  x = jnp.ones((1, 128, 2, d), dtype)
  if kwargs.pop("segments", False):
    kwargs["segment_ids"] = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(ValueError, match=match):
    jsa.attention(x, x, x, kwargs.pop("mask", masks.causal()), backend="mosaic_gpu",
                  interpret=True, **kwargs)


def test_box_groups():
  """KV tiles one TMA copy can take (per 64 columns): at most 2 dims wider than one group of
  8 rows after the last dim is counted in groups of 8; 1-D blocks and tiles whose last dim
  is not a multiple of 8 keep their per-row copies. The tile choice counts the copies: on
  perfectly block-sparse 3-D (stride = kernel) it keeps the 4x4x8 box over 2x4x16 tiles
  (8 row copies), which it preferred before box copies existed."""
  assert mg_boxes._box_groups((4, 4, 8)) == (4, 4)
  assert mg_boxes._box_groups((8, 16)) == (8, 2)
  assert mg_boxes._box_groups((2, 4, 8)) == (2, 4)
  assert mg_boxes._box_groups((16, 8)) == (16,)
  assert mg_boxes._box_groups((1, 1, 128)) == (16,)
  assert mg_boxes._box_groups((1, 8, 8)) == (8,)
  assert mg_boxes._box_groups((2, 4, 16)) is None  # 3 dims wider than 1: over the TMA's 5
  assert mg_boxes._box_groups((128,)) is None
  assert mg_boxes._box_groups((16, 4)) is None
  assert mg_cost._tma_copies((4, 4, 8)) == 2 and mg_cost._tma_copies((2, 4, 16)) == 8
  na = masks.neighborhood((16, 64, 64), (8, 16, 16), (8, 16, 16))
  qt, kt = mg_cost.auto_tiles(na, 128, 128)
  assert mg_boxes._box_groups(kt) is not None and math.prod(kt) == 128
  # The box view is a reshape of the caller's [batch, *spatial, heads, d] array.
  x = jnp.arange(2 * 4 * 16 * 3 * 128, dtype=jnp.float32).reshape(2, 4 * 16, 3, 128)
  boxes = mg_boxes._Boxes((4, 16), (2, 8), (2, 2))
  view = mg_boxes._box_view(x, boxes)
  assert view.shape == (2, 4, 2, 8, 3, 2, 64)
  assert float(view[1, 3, 1, 5, 2, 1, 7]) == float(x[1, 3 * 16 + 13, 2, 71])


def test_tile_choice_prices_the_permutation():
  """Tiles that do not divide the leading spatial dims run on a permuted copy (about a
  third of a 2-D NA forward): the choice takes box tiles where they cost less than that
  (60x64), and keeps 128-row query tiles either way."""
  from jax_sparse_attn.simulate import visited_blocks
  for spatial, kernel in [((60, 64), (13, 13)), ((100, 96), (33, 17)), ((9, 22, 24), (4, 7, 7))]:
    mask = masks.neighborhood(spatial, kernel)
    qt, kt = mg_cost.auto_tiles(mask, 128, 128)
    assert math.prod(qt) == 128 and math.prod(kt) in (64, 128)
    ones = (1,) * len(spatial)
    box = (mg_boxes._box_layout(TiledLayout(spatial, ones, qt))
           and mg_boxes._box_layout(TiledLayout(spatial, ones, kt)))
    if spatial == (60, 64):  # (16, 8) would permute; a box tile wins
      assert box and visited_blocks(mask, qt, kt)[0] > 0


def _split_plan(spatial, kernel, stride=1, causal=False, q_tile=(16, 8), kv_tile=(8, 8)):
  mask = masks.neighborhood(spatial, kernel, stride, 1, causal)
  ones = (1,) * len(spatial)
  return gathered(make_plan(mask, TiledLayout(spatial, ones, q_tile),
                            TiledLayout(spatial, ones, kv_tile)))


def test_split_lists_are_the_half_tiles_maps():
  """Per-warpgroup lists: each warpgroup's active steps visit exactly the KV blocks its
  64-row half tile's block map visits (brute force over the element mask), with a partial
  block's table and table 0 (all zeros: no bias) on full ones; shared blocks come first,
  then pairs (two loads), then the longer list's leftovers; loads cover the tile's map."""
  plan = _split_plan((37, 21), (9, 5))  # odd sizes: padded half tiles at the borders
  onehot, tables, loads, counts = mg_tables._split_inputs(plan, 0.125)
  assert onehot.shape == (128, 16) and tables.shape[1:] == (16, 64)
  assert not np.asarray(tables[0], np.float32).any()
  assert (counts[:, 5] > 0).any() and (counts[:, 2] != counts[:, 3]).any()  # pairs, leftovers
  lo, hi, c = plan.q_lo, plan.q_hi, plan.kv_c
  bmap = plan.block_map
  for qi in range(bmap.num_q_blocks):
    steps, n_loads, act0, act1, shared, pairs = counts[qi]
    assert steps == max(act0, act1) and n_loads == shared + 2 * pairs + (steps - shared - pairs)
    assert set(loads[qi, :n_loads, 0]) == set(bmap.kv_ids[qi, :bmap.kv_counts[qi]])
    for w, active in ((0, act0), (1, act1)):
      rows = np.arange(qi * 128 + w * 64, qi * 128 + w * 64 + 64)
      mine = []
      for t in range(active):
        first = t + min(max(t - shared, 0), pairs)
        first += w if shared <= t < shared + pairs else 0
        mine.append((loads[qi, first, 0], loads[qi, first, 1 + w]))
      want = {}
      for j in range(bmap.num_kv_blocks):
        keys = np.arange(j * 64, j * 64 + 64)
        ok = np.ones((64, 64), bool)
        for d in range(lo.shape[0]):
          ok &= (lo[d][rows, None] <= c[d][None, keys]) & (c[d][None, keys] <= hi[d][rows, None])
        if ok.any():
          want[j] = ok.all()
      assert sorted(j for j, _ in mine) == sorted(want), (qi, w)
      for j, table in mine:
        assert (table == 0) == want[j], (qi, w, j)


def test_split_forward():
  """Per-warpgroup lists vs the brute force (forward, lse and gradients) where tiles have
  pairs and leftovers, with GQA, padded borders and a causal dim."""
  p = dict(problem=((37, 21), (9, 5), (1, 1), (1, 1), (False, False)), batch=1, heads=2, kv_heads=1,
           head_dim=64, dtype=jnp.bfloat16, seed=3, tile_q=(16, 8), tile_kv=(8, 8))
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=MosaicGPUConfig(split=True))
  p = dict(p, problem=((19, 16), (5, 7), (2, 1), (1, 1), (True, False)), heads=2, kv_heads=1,
           dtype=jnp.float16, seed=4)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=MosaicGPUConfig(split=True))


def test_split_where_it_pays():
  """Per-warpgroup lists by default where they skip >= ~20% of the work (2-D stride k/2),
  not for dense windows (2-D NA k=33: 13%); the tile choice models both (`auto_tiles`)."""
  strided = _split_plan((64, 64), (16, 16), (8, 8), q_tile=(16, 8), kv_tile=(4, 16))
  assert mg_cost._split_pays(strided.block_map, mg_tables._split_inputs(strided, 0.125)[3])
  window = _split_plan((64, 64), (33, 33))
  assert not mg_cost._split_pays(window.block_map, mg_tables._split_inputs(window, 0.125)[3])
  # The forward's decision (`split_lists`): by default where it pays, forced or refused by
  # the config.
  assert mg_cost.split_lists(strided, 0.125) is not None
  assert mg_cost.split_lists(window, 0.125) is None
  assert mg_cost.split_lists(window, 0.125, MosaicGPUConfig(split=True)) is not None
  assert mg_cost.split_lists(strided, 0.125, MosaicGPUConfig(split=False)) is None
  assert mg_cost.split_lists(strided, 0.125, MosaicGPUConfig(mask_mma=False)) is None
  na = lambda *a: masks.neighborhood(*a, 1, False)
  # Stride k/2 now takes window-anchored boxes (`test_window_boxes_bounds`).
  assert mg_cost.auto_tiles(na((128, 128), (16, 16), (8, 8)), 128, 128) == ((8, 16), (16, 8))
  assert mg_cost.auto_tiles(na((128, 128), (33, 33), 1), 128, 128) == ((8, 16), (8, 16))
  assert mg_cost.tile_costs(na((128, 128), (16, 16), (8, 8)), (16, 8), (4, 16))["split"] < (
      mg_cost.tile_costs(na((128, 128), (16, 16), (8, 8)), (16, 8), (4, 16))["grid"])
  for a in (((16, 64, 64), (8, 16, 16), 1), ((30, 17), (5, 5), 1)):  # boxes: rows of 8k
    qt, kt = mg_cost.auto_tiles(na(*a), 128, 128)
    assert qt[-1] % 8 == 0 and mg_boxes._half_tile(qt)[0][-1] % 8 == 0 and kt[-1] % 8 == 0
  # No split: 1-D sequences, runtime maps, and one-hot columns of the half tile > 16.
  assert mg_tables._split_inputs(make_plan(masks.causal(), jsa.layout.SequenceLayout(300, 128),
                                    jsa.layout.SequenceLayout(300, 64)), 0.125) is None
  assert mg_tables._split_inputs(_split_plan((64, 64), (7, 7), q_tile=(4, 32), kv_tile=(4, 16)),
                          0.125) is None  # half (2, 32): 34 columns


@pytest.mark.parametrize("lazy,case", [(2.0, "full"), (0.25, "causal_segments"), (2.0, "na_mma"),
                                       (0.25, "na_split")])
def test_lazy_rescale_forward(monkeypatch, lazy, case):
  """The forward keeping each row's running max until it grows by more than `lazy` log2
  units (`attention_fwd.LAZY_RESCALE`, FlashAttention-4's conditional rescale) vs the brute
  force: with a small threshold (or queries 4x the keys' scale) rows both keep and move their
  max within a row; full steps, element-tested steps with segment ids (rows that see no key:
  zeros), MMA-bias steps and per-warpgroup lists. Interpret mode multiplies by the factor
  (exactly 1 where kept); the GPU's per-thread branch is checked by the lowering test below
  and on the device."""
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd
  monkeypatch.setattr(attention_fwd, "LAZY_RESCALE", lazy)
  if case in ("full", "causal_segments"):
    sq, skv = (100, 390) if case == "full" else (300, 300)
    p = dict(batch=1, sq=sq, skv=skv, heads=4, kv_heads=2, head_dim=64,
             mask=case.split("_")[0], segments=case == "causal_segments",
             dtype=jnp.bfloat16, seed=7, q_std=4.0)
    backend_cases.check_attention(p, "mosaic_gpu", interpret=True)
  else:
    p = dict(problem=((37, 21), (9, 5), (1, 1), (1, 1), (False, False)), batch=1, heads=2,
             kv_heads=1, head_dim=64, dtype=jnp.float16, seed=3, tile_q=(16, 8),
             tile_kv=(8, 8))
    backend_cases.check_na(p, "mosaic_gpu", interpret=True,
                           config=MosaicGPUConfig(split=case == "na_split", mask_mma=True))


def test_lazy_rescale_lowers(monkeypatch):
  """With `LAZY_RESCALE` the CUDA forward builds its per-thread branch (`_rescaled`, Mosaic
  GPU's IR through `plgpu.inline_mgpu`) on one-list rows, MMA-bias steps and element tests."""
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd
  monkeypatch.setattr(attention_fwd, "LAZY_RESCALE", 8.0)
  branches, rescaled = [], attention_fwd._rescaled

  def recorded(acc, alpha, branch):
    branches.append(branch)
    return rescaled(acc, alpha, branch)

  monkeypatch.setattr(attention_fwd, "_rescaled", recorded)
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  for f, args in (
      (lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu"),
       (S(1, 1000, 4, 128),) * 3),
      (lambda q, k, v: jsa.na2d(q, k, v, 33, backend="mosaic_gpu"), (S(1, 64, 64, 4, 128),) * 3),
      (lambda q, k, v: jsa.attention(q, k, v, masks.causal() & (masks.sliding_window(300)
                                                                | masks.sink(4)),
                                     backend="mosaic_gpu"), (S(1, 1000, 4, 64),) * 3)):
    branches.clear()
    text = export_for_gpu(f, *args).mlir_module()
    assert text.count("@mosaic_gpu_v2(") == 1 and branches and all(branches)


@pytest.mark.parametrize("case", ["na2d", "na3d_strided", "causal_gqa", "na1d", "na2d_split",
                                  "na3d_rows", "na3d_window_3dims", "na3d_padded"])
def test_lowers_for_gpu(case):
  """Pallas -> Mosaic GPU lowering on CPU (PTX compilation happens on the GPU), forward and
  backward: Mosaic GPU for 1-D masks, 1-D and 3-D neighborhoods (strided ones included) and
  2-D ones of >= 1024 keys at 128 columns, the Triton kernels for other 2-D ones
  (`policy.picks_mosaic`)."""
  S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  if case == "na2d":
    f = lambda q, k, v: jsa.na2d(q, k, v, 33, backend="mosaic_gpu")
    args = (S(2, 128, 128, 16, 128),) * 3
  elif case == "na3d_padded":  # a padding mask: segment vectors on the box path, Triton's
    # backward (`hopper_backward_neighborhood` with segments)
    valid = jnp.broadcast_to(jnp.arange(64) < 56, (1, 16, 64, 64))
    f = lambda q, k, v: jsa.na3d(q, k, v, (8, 16, 16), backend="mosaic_gpu", kv_valid=valid)
    args = (S(1, 16, 64, 64, 4, 128),) * 3
  elif case == "na2d_split":  # per-warpgroup lists (stride k/2's best grid tiles)
    f = lambda q, k, v: jsa.na2d(q, k, v, 16, stride=8, backend="mosaic_gpu",
                                 q_tile_shape=(16, 8), kv_tile_shape=(4, 16),
                                 config=MosaicGPUConfig(split=True))
    args = (S(2, 128, 128, 16, 128),) * 3
  elif case == "na3d_rows":  # one TMA copy per row of the KV tile instead of box copies
    f = lambda q, k, v: jsa.na3d(q, k, v, (8, 16, 16), backend="mosaic_gpu",
                                 config=MosaicGPUConfig(box_copies=False))
    args = (S(1, 16, 64, 64, 4, 128),) * 3
  elif case == "na3d_window_3dims":  # window boxes of a tile with 3 non-unit dims, raw view
    f = lambda q, k, v: jsa.na3d(q, k, v, (4, 7, 7), stride=(2, 3, 3), backend="mosaic_gpu",
                                 q_tile_shape=(2, 8, 8), kv_tile_shape=(2, 4, 16),
                                 config=MosaicGPUConfig(kv_windows=True,
                                                        backward="mosaic_gpu"))  # 196 keys
    args = (S(1, 8, 24, 24, 4, 128),) * 3
  elif case == "na1d":  # 1-D neighborhoods train on these kernels too
    f = lambda q, k, v: jsa.na1d(q, k, v, 257, dilation=2, backend="mosaic_gpu")
    args = (S(2, 4000, 8, 128),) * 3
  elif case == "na3d_strided":  # window-anchored boxes (the default of stride k/2)
    f = lambda q, k, v: jsa.na3d(q, k, v, (8, 16, 16), stride=(4, 8, 8), backend="mosaic_gpu")
    args = (S(1, 16, 64, 64, 4, 128),) * 3
  else:
    f = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu")
    args = (S(2, 1000, 8, 64), S(2, 1000, 2, 64), S(2, 1000, 2, 64))
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), *args).mlir_module()
  if case == "na3d_rows":  # forward, then dK/dV (skipping dead quarters) and dQ
    assert text.count("@mosaic_gpu_v2(") == 2 and "__gpu$xla.gpu.triton" not in text
  elif case in ("causal_gqa", "na1d", "na2d"):
    # fwd, and dK/dV with dQ in one launch (`attention_bwd.JOINT_DQ`)
    assert text.count("@mosaic_gpu_v2(") == 2 and "__gpu$xla.gpu.triton" not in text
  elif case in ("na3d_strided", "na3d_window_3dims"):
    # fwd, dK/dV, and dQ over window-anchored KV boxes (`attention_bwd.WINDOW_DQ`: other K/V
    # arrays than dK/dV's, so a launch of its own)
    assert text.count("@mosaic_gpu_v2(") == 3 and "__gpu$xla.gpu.triton" not in text
    assert "sparse_attention_bwd_dq" in text
  else:
    assert text.count("@mosaic_gpu_v2(") == 1
    assert text.count("__gpu$xla.gpu.triton") >= 2  # dQ and dK/dV


def test_padded_neighborhood_picks():
  """Neighborhoods with a padding mask or segment ids: `auto` takes the Hopper forward for
  2-D windows of >= 256 keys and 3-D ones of >= 1024 (Triton's below, and for 1-D), on tiles
  chosen for the element test (`cost.auto_tiles`' ``segments``), and Triton's backward at 64
  and 128 columns (the role-split Hopper kernels above 128), with the backward plan's blocks
  to match (measured, `config.hopper_forward_segments`)."""
  from pallas_kernels.gpu import triton_attention
  from pallas_kernels.gpu.mosaic_gpu import config as mg_config
  pick = lambda m, seg, d=128: mg_config.supports(m, jnp.bfloat16, d, seg, None, None, None,
                                                   None)
  na = masks.neighborhood
  big2, big3 = na((128, 128), 33), na((16, 64, 64), (8, 16, 16))
  for m in (big2, big3):
    assert pick(m, True) and pick(m, False)
  for m in (na((96, 96), 17), na((64, 128), 25)):
    assert pick(m, True) and pick(m, False)
  for m in (na((48, 48), 13), na((16, 64, 64), (4, 9, 9)), na(8192, 1025)):
    assert pick(m, False) and not pick(m, True)
  from pallas_kernels.gpu.mosaic_gpu import cost  # 64-key tiles for the element test
  assert cost.auto_tiles(na((96, 96), 17), 128, 128) == ((8, 16), (4, 32))
  assert cost.auto_tiles(na((96, 96), 17), 128, 128, True) == ((8, 16), (8, 8))
  backward = mg_config.hopper_backward_neighborhood
  assert backward(big3, 128) and not backward(big3, 128, segments=True)
  assert not backward(big3, 64, segments=True) and backward(big3, 256, segments=True)
  blocks = lambda seg: mg_config.default_backward_map_blocks(128, jnp.bfloat16, None, big3, seg)
  assert blocks(False) == (128, 128)
  assert blocks(True) == triton_attention.default_backward_map_blocks(128, jnp.bfloat16, None)


def _window_plan(spatial, kernel, stride=1, causal=False, q_tile=(8, 16), kv_tile=(16, 8)):
  nd = len(spatial)
  mask = masks.neighborhood(spatial, kernel, stride, 1, causal)
  return gathered(make_plan(mask, TiledLayout(spatial, (1,) * nd, q_tile),
                            TiledLayout(spatial, (1,) * nd, kv_tile)), True)


@settings(max_examples=examples(25), deadline=None)
@given(data=st.data())
def test_window_boxes_count_every_pair_once(data):
  """Window-anchored KV boxes (`_window_inputs`) against the brute-force mask: summed over a
  query tile's steps, every (query, key) pair the mask allows passes exactly once (boxes
  moved back from the array's edge mask the keys they share) and no other pair passes; full
  steps pass every pair of the tile's valid queries."""
  nd = data.draw(st.sampled_from([2, 3]))
  if nd == 2:
    spatial = (data.draw(st.integers(8, 24)), data.draw(st.integers(8, 40)))
    # 128-row 2-D tiles with at most 32 one-hot columns: 8x16 and 16x8 (4x32 has 36).
    q_tile, kv_tile = data.draw(st.sampled_from([((8, 16), (16, 8)), ((16, 8), (8, 8)),
                                                 ((16, 8), (16, 8))]))
  else:
    spatial = (data.draw(st.integers(2, 6)), data.draw(st.integers(4, 12)),
               data.draw(st.integers(8, 20)))
    q_tile, kv_tile = data.draw(st.sampled_from([((4, 4, 8), (4, 4, 8)),
                                                 ((2, 8, 8), (1, 8, 8))]))
  kv_tile = tuple(min(t, s) for t, s in zip(kv_tile, spatial))
  kernel = tuple(data.draw(st.integers(1, s)) for s in spatial)
  stride = tuple(data.draw(st.integers(1, k)) for k in kernel)
  causal = tuple(data.draw(st.booleans()) for _ in spatial)
  plan = _window_plan(spatial, kernel, stride, causal, q_tile, kv_tile)
  built = mg_tables._window_inputs(plan, 0.125)
  assert built is not None
  origins, counts, onehot, tables, table_ids = built
  bias = np.asarray(onehot, np.float32)
  tables = np.asarray(tables, np.float32)
  dense = masks.neighborhood(spatial, kernel, stride, 1, causal)
  grid = plan.q_layout.tile_grid
  n = math.prod(spatial)
  key_pos = np.stack(np.unravel_index(np.arange(math.prod(kv_tile)), kv_tile), axis=1)
  for qi in range(math.prod(grid)):
    g = np.unravel_index(qi, grid)
    rows = np.stack(np.unravel_index(np.arange(128), q_tile), axis=1) + np.asarray(g) * q_tile
    valid = np.all(rows < spatial, axis=1)
    flat_q = np.ravel_multi_index(tuple(np.minimum(rows, np.asarray(spatial) - 1).T), spatial)
    seen = np.zeros((128, n), np.int64)
    for t in range(counts[qi, 1]):
      keys = origins[qi, t] + key_pos
      assert np.all(keys >= 0) and np.all(keys < spatial)  # boxes lie inside the array
      flat_k = np.ravel_multi_index(tuple(keys.T), spatial)
      ok = (np.ones((128, len(flat_k)), bool) if t < counts[qi, 0]
            else bias @ tables[table_ids[qi, t]] > 0.5 * mma_masks_value(tables))
      if t < counts[qi, 0]:  # full: every pair of the valid queries is in the mask
        assert np.asarray(dense(flat_q[valid][:, None], flat_k[None, :])).all()
      np.add.at(seen, (slice(None), flat_k), ok.astype(np.int64))
    want = np.asarray(dense(flat_q[:, None], np.arange(n)[None, :]))
    np.testing.assert_array_equal(seen[valid], want[valid].astype(np.int64))


def mma_masks_value(tables):
  """The masked bias value of `tables` (their minimum): a pair passes where its sum is 0."""
  return float(tables.min()) if tables.min() < 0 else -1.0


def test_window_boxes_bounds():
  """The simulator's window count (`simulate.window_blocks`): 3-D stride k/2, whose windows
  start off the 4x4x8 grid (NATTEN centres them on the stride group), is perfectly
  block-sparse with anchored boxes (32x, the ideal) against 18.6x on the grid; the kernel's
  lists have that many steps; the tile choice takes them where they pay."""
  from jax_sparse_attn.simulate import simulate, visited_blocks, window_blocks
  mask = masks.neighborhood((16, 64, 64), (8, 16, 16), (4, 8, 8))
  assert window_blocks(mask, (4, 4, 8), (4, 4, 8)) == (8192, 8192)
  assert visited_blocks(mask, (4, 4, 8), (4, 4, 8)) == (14080, 3840)
  r = simulate((16, 64, 64), (8, 16, 16), (4, 8, 8), q_tile_shape=(4, 4, 8),
                        kv_tile_shape=(4, 4, 8))
  assert r.window_speedup_bound == pytest.approx(32.0) and r.block_speedup_bound < 19
  assert simulate((64, 64), 7, dilation=2).window_speedup_bound is None
  assert mg_cost.auto_tiles(mask, 128, 128) == ((4, 4, 8), (4, 4, 8))
  assert mg_cost.window_pays(mask, (4, 4, 8), (4, 4, 8))
  na = masks.neighborhood((128, 128), (33, 33))
  assert not mg_cost.window_pays(na, (8, 16), (8, 16))  # a dense window is on the grid already
  plan = gathered(make_plan(mask, TiledLayout((16, 64, 64), (1, 1, 1), (4, 4, 8)),
                            TiledLayout((16, 64, 64), (1, 1, 1), (4, 4, 8))), True)
  origins, counts, *_ = mg_cost.window_lists(plan, 0.125)
  assert np.all(counts == 16)  # 8x16x16 window / 4x4x8 boxes, all full
  assert mg_cost.window_lists(plan, 0.125, MosaicGPUConfig(kv_windows=False)) is None
  assert mg_cost.window_lists(plan, 0.125, MosaicGPUConfig(split=True)) is None
  na_plan = _window_plan((128, 128), (33, 33), q_tile=(8, 16), kv_tile=(8, 16))
  assert mg_cost.window_lists(na_plan, 0.125) is None
  assert mg_cost.window_lists(na_plan, 0.125, MosaicGPUConfig(kv_windows=True)) is not None
  # Odd kernels put windows off the grid too: 2-D k9 with (8, 16) tiles visits fewer boxes.
  assert mg_cost.window_pays(masks.neighborhood((32, 32), 9), (8, 16), (8, 16))
  assert mg_tables._window_inputs(gathered(make_plan(
      masks.neighborhood((32, 32), 5, 1, 2), TiledLayout((32, 32), (2, 2), (8, 16)),
      TiledLayout((32, 32), (2, 2), (8, 16))), True), 0.125) is None  # dilation


@pytest.mark.parametrize("problem,tiles,heads", [
    (((21, 30), (16, 12), (8, 6), (1, 1), (False, False)), ((8, 16), (16, 8)), (4, 2)),
    (((4, 8, 12), (3, 5, 8), (2, 3, 4), (1, 1, 1), (False, True, False)),
     ((2, 8, 8), (2, 4, 8)), (2, 1)),
    (((13, 27), (7, 9), (1, 1), (1, 1), (True, False)), ((8, 16), (8, 16)), (2, 2)),
])
def test_window_forward(problem, tiles, heads):
  """Window-anchored KV boxes (forced) vs the brute force: strided windows off the grid,
  boxes moved back from edges, a causal dim, GQA; gradients through the Triton backward."""
  p = dict(problem=problem, batch=1, heads=heads[0], kv_heads=heads[1], head_dim=64,
           dtype=jnp.bfloat16, seed=7, tile_q=tiles[0], tile_kv=tiles[1])
  backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=MosaicGPUConfig(kv_windows=True))


AUTO_MASKS = {
    "causal": masks.causal(),
    "window_sink": masks.causal() & (masks.sliding_window(100) | masks.sink(4)),
    "function": masks.from_function(lambda q, k: (q - k) % 3 == 0),
    "full": masks.full(),
}


@settings(max_examples=examples(20), deadline=None)
@given(mask=st.sampled_from(sorted(AUTO_MASKS)), head_dim=st.sampled_from([16, 32, 48, 64, 96,
                                                                           128, 200, 256]),
       dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]),
       segments=st.booleans(), block_q=st.sampled_from([None, 64, 128]),
       block_kv=st.sampled_from([None, 64, 128]), seq=st.integers(100, 400))
def test_auto_never_picks_a_path_that_raises(mask, head_dim, dtype, segments, block_q,
                                             block_kv, seq):
  """On a Hopper GPU (patched), a call `auto` sends to `mosaic_gpu` traces, forward and
  gradients (shapes only), wherever the same call on Triton does: auto's choice adds no
  ValueError of its own."""
  saved = jax.default_backend, mgpu.is_hopper
  jax.default_backend, mgpu.is_hopper = (lambda: "gpu"), (lambda: True)
  try:
    q = jax.ShapeDtypeStruct((1, seq, 4, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, seq, 2, head_dim), dtype)
    seg = jnp.zeros((1, seq), jnp.int32).at[:, seq // 2:].set(1) if segments else None

    def trace(backend):
      loss = lambda q, k, v: jnp.sum(jsa.attention(
          q, k, v, AUTO_MASKS[mask], segment_ids=seg, backend=backend, block_q=block_q,
          block_kv=block_kv, interpret=True).astype(jnp.float32))
      return jax.eval_shape(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv)

    picked = jsa.resolve_backend("auto", AUTO_MASKS[mask], dtype=dtype, head_dim=head_dim,
                                 segments=segments, block_q=block_q, block_kv=block_kv)
    try:
      trace("triton")
    except ValueError:
      return  # bad input for the kernels anyway
    trace("auto")
    assert picked in ("mosaic_gpu", "triton")
  finally:
    jax.default_backend, mgpu.is_hopper = saved


def test_interpret_scheduler_warning(monkeypatch):
  """GPU interpret mode warns (once) where XLA_FLAGS leaves XLA:CPU's concurrency-optimized
  scheduler on, under which it can deadlock (this suite turns it off: conftest.py)."""
  import warnings
  from pallas_kernels.gpu.mosaic_gpu import config as mg_config
  assert mg_config.interpret_params(False) is False
  monkeypatch.setattr(mg_config, "_warned_scheduler", [])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert mg_config.interpret_params(True)  # the suite's flags: no warning
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.warns(RuntimeWarning, match="concurrency_optimized_scheduler=false"):
    mg_config.interpret_params(True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mg_config.interpret_params(True)  # once per process
