"""Pallas Triton kernels in interpret mode (CPU) vs the float64 brute force."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import backend_cases
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import element_mask, intervals_per_term, make_plan
from pallas_kernels.gpu import TritonConfig, export_for_gpu, mma_masks, triton_attention

KW = dict(interpret=True, block_q=32, block_kv=32)


@settings(max_examples=examples(4))
@given(p=backend_cases.seq_problems(max_len=70))
def test_attention(p):
  if p["mask"] == "or":  # generic masks: covered by the function case below (slow in interpret)
    p = dict(p, mask="function")
  backend_cases.check_attention(p, "triton", **KW)


@settings(max_examples=examples(4))
@given(p=backend_cases.na_problems())
def test_na(p):
  backend_cases.check_na(p, "triton", interpret=True, block_q=16, block_kv=16)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
  p = dict(batch=1, sq=45, skv=45, heads=4, kv_heads=2, head_dim=32, mask="causal_window",
           segments=False, dtype=dtype, seed=3)
  backend_cases.check_attention(p, "triton", **KW)


def test_kernel_tiles_smaller_than_map_blocks():
  # Block-map blocks of 32, kernel tiles of 16 (two programs per Q block, two tiles per entry).
  p = dict(batch=1, sq=70, skv=70, heads=2, kv_heads=1, head_dim=16, mask="window",
           segments=True, dtype=jnp.float32, seed=5)
  cfg = TritonConfig(block_q=16, block_kv=16, bwd_block_q=16, bwd_block_kv=16, dq_block_q=16,
                     dq_block_kv=16, unsigned_intervals=False)  # the signed interval test
  backend_cases.check_attention(p, "triton", config=cfg, **KW)


def test_array_rows():
  """`from_array` with rows of one run each (some empty) as row bounds, cross-attention."""
  p = dict(batch=1, sq=50, skv=70, heads=2, kv_heads=1, head_dim=16, mask="array_rows",
           segments=False, dtype=jnp.float32, seed=9)
  backend_cases.check_attention(p, "triton", **KW)


def test_array_runs():
  """`from_array` with rows of 1-3 runs: a union of row bounds, tested as intervals per term
  (`plan.intervals_per_term`), GQA, segment ids."""
  p = dict(batch=1, sq=90, skv=90, heads=4, kv_heads=2, head_dim=16, mask="array_runs",
           segments=True, dtype=jnp.float32, seed=10)
  backend_cases.check_attention(p, "triton", **KW)
  mask = backend_cases.seq_mask("array_runs", 90, 90)
  plan = make_plan(mask, SequenceLayout(90, 32), SequenceLayout(90, 32))
  per_term = intervals_per_term(plan)
  assert plan.mask_fn is not None and per_term.mask_fn is None and per_term.terms == 3
  pos = np.arange(plan.q_lo.shape[1])
  np.testing.assert_array_equal(  # the kernels' test equals the array on every position
      element_mask(per_term, pos[:, None], pos[None], np), element_mask(plan, pos[:, None],
                                                                         pos[None], np))


@pytest.mark.parametrize("union_terms", [True, pytest.param(False, marks=pytest.mark.extended)])
def test_union_forms(monkeypatch, union_terms):
  """Unions of interval masks tested as intervals per term (`UNION_TERMS`, the default) or
  through the mask function on kernel positions."""
  monkeypatch.setattr(triton_attention, "UNION_TERMS", union_terms)
  p = dict(batch=1, sq=90, skv=90, heads=4, kv_heads=2, head_dim=16, mask="union3",
           segments=True, dtype=jnp.float32, seed=21)
  backend_cases.check_attention(p, "triton", **KW)
  plan = make_plan(backend_cases.seq_mask("union3", 90, 90), SequenceLayout(90, 32),
                   SequenceLayout(90, 32))
  per_term = intervals_per_term(plan, union_terms)
  assert (per_term.terms, per_term.mask_fn is None) == ((3, True) if union_terms else (1, False))


def test_head_dim_padding_and_masked_rows():
  p = dict(batch=1, sq=40, skv=40, heads=2, kv_heads=2, head_dim=24, mask="masked_rows",
           segments=False, dtype=jnp.float32, seed=7)
  backend_cases.check_attention(p, "triton", **KW)


def test_bad_config():
  x = jnp.ones((1, 64, 2, 16))
  with pytest.raises(ValueError, match="TritonConfig.block_q=48 must be a power of two"):
    jsa.attention(x, x, x, backend="triton", interpret=True, block_q=32,
                  config=TritonConfig(block_q=48))


def test_split_partial_groups_matches():
  p = dict(problem=((9, 11), (3, 5), (1, 2), (2, 1), (False, True)), batch=1, heads=2,
           kv_heads=1, head_dim=16, dtype=jnp.float32, seed=9, tile_q=(2, 4), tile_kv=(2, 2))
  backend_cases.check_na(p, "triton", interpret=True,
                         config=TritonConfig(block_q=8, block_kv=4, bwd_block_q=8,
                                             bwd_block_kv=4, dq_block_q=8, dq_block_kv=4,
                                             split_partial_groups=True))


def test_single_loop_matches():
  p = dict(batch=1, sq=53, skv=53, heads=2, kv_heads=2, head_dim=16, mask="masked_rows",
           segments=True, dtype=jnp.float32, seed=12)
  backend_cases.check_attention(p, "triton", config=TritonConfig(single_loop=True), **KW)


@settings(max_examples=examples(3))
@given(p=backend_cases.na_problems(dtypes=(jnp.float32, jnp.bfloat16)))
def test_na_element_masks(p):
  # Partial blocks through the per-element interval test instead of the MMA bias.
  backend_cases.check_na(p, "triton", interpret=True, block_q=16, block_kv=16,
                         config=TritonConfig(mask_mma=False))


@settings(max_examples=examples(2))
@given(p=backend_cases.na_problems(dtypes=(jnp.bfloat16, jnp.float16)))
def test_na_low_precision(p):
  backend_cases.check_na(p, "triton", interpret=True, block_q=16, block_kv=16)


@pytest.mark.parametrize("tile, rows, cols, width", [
    ((8, 16), 128, ((0, 8, 16), (8, 16, 1)), 32),
    ((8, 16), 64, ((0, 4, 16), (4, 16, 1)), 32),  # a kernel tile of half a map tile
    ((4, 4, 8), 128, ((0, 4, 32), (4, 4, 8), (8, 8, 1)), 16),
    ((2, 8, 8), 64, ((-1, 1, 64), (0, 8, 8), (8, 8, 1)), 16),  # extent 1: folded
    ((1, 8, 8), 1, ((-1, 1, 64), (-1, 1, 8), (0, 1, 1)), 16),
    ((64,), 64, ((0, 64, 1),), 64),
])
def test_mma_columns(tile, rows, cols, width):
  assert mma_masks.onehot_columns(tile, rows) == (cols, width)


def test_wide_tiles_use_element_masks():
  # Tiles of 64 tokens in 1-D need 64 bias columns (> 32) on the query side. With tables the
  # forward takes the one-hot over the key tile (32 columns); computing the tests in the loop
  # (one-hot over the program's own tile) it falls back to the element test.
  p = dict(problem=((150,), (21,), (1,), (2,), (True,)), batch=1, heads=2, kv_heads=1,
           head_dim=16, dtype=jnp.float32, seed=3, tile_q=(64,), tile_kv=(32,))
  mask = masks.neighborhood((150,), 21, 1, 2, True)
  plan = make_plan(mask, TiledLayout((150,), (2,), (64,)), TiledLayout((150,), (2,), (32,)))
  for tables in (True, False):
    config = TritonConfig(mask_tables=tables)
    cfg = triton_attention.default_config(16, jnp.float32, plan, config)
    spec = lambda *a, **kw: mma_masks.mask_spec(plan, False, cfg, *a, 0.25, **kw)
    fwd = spec(64, 32)
    assert (fwd.mma_width, fwd.mma_onehot_rows) == ((32, False) if tables else (0, True))
    assert spec(32, 64, loop_is_kv=False).mma_cols is not None  # over a key tile of 32
    backend_cases.check_na(p, "triton", interpret=True, config=config)


def _fwd_bwd(f):
  return lambda *a: jax.grad(lambda *b: jnp.sum(f(*b).astype(jnp.float32)), (0, 1, 2))(*a)


@pytest.mark.parametrize("case", ["causal_gqa", "window_segments_d96", "na1d_causal", "na2d",
                                  "na3d_dilated"])
def test_lowers_for_gpu(case):
  # The Pallas -> Triton lowering of forward, dQ and dK/dV, on a machine with no GPU.
  bf16 = jnp.bfloat16
  if case == "causal_gqa":
    q, kv = ((2, 1000, 8, 128), bf16), ((2, 1000, 2, 128), bf16)
    f = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="triton")
  elif case == "window_segments_d96":
    q = kv = ((2, 777, 4, 96), bf16)
    seg = jnp.zeros((2, 777), jnp.int32)
    f = lambda q, k, v: jsa.attention(q, k, v, masks.sliding_window(100), segment_ids=seg,
                                      backend="triton")
  else:
    spatial, kernel, dilation, causal = {
        "na1d_causal": ((300,), 31, 1, True), "na2d": ((64, 64), (17, 17), 1, False),
        "na3d_dilated": ((8, 16, 16), (3, 5, 5), (1, 2, 1), (True, False, False))}[case]
    q = kv = ((1,) + spatial + (4, 128), bf16)
    f = lambda q, k, v: jsa.na(q, k, v, kernel, 1, dilation, causal, backend="triton")
  args = [jax.ShapeDtypeStruct(*x) for x in (q, kv, kv)]
  for fn, calls in ((f, 1), (_fwd_bwd(f), 3)):
    text = export_for_gpu(fn, *args).mlir_module()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("onehot, tables", [("rows", True), ("loop", True), ("rows", False),
                                            ("loop", False)])
@pytest.mark.parametrize("tile_q, tile_kv", [((1, 4, 4), (1, 2, 8)), ((2, 2, 4), (1, 1, 16))])
def test_na_folded_dims(tile_q, tile_kv, onehot, tables):
  # Tiles with one coordinate along a dim: that dim's test is folded into another's columns.
  # Both one-hot sides, test matrices from tables and computed in the loop.
  p = dict(problem=((5, 9, 10), (3, 5, 3), (1, 2, 1), (1, 1, 2), (True, False, False)),
           batch=1, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32, seed=21,
           tile_q=tile_q, tile_kv=tile_kv)
  backend_cases.check_na(p, "triton", interpret=True,
                         config=TritonConfig(mma_onehot=onehot, mask_tables=tables))


def test_backward_tiles_differ_from_forward():
  # Auto tiles on the gathering backend: the backward runs its own plan (tiles matching its
  # kernels' blocks) over the same caller-order tokens; gradients still match.
  from jax_sparse_attn import ops
  problem = ((30, 27), (7, 9), (1, 1), (1, 2), (False, True))
  mask = masks.neighborhood(*problem)
  impl = ops._get_backend("triton")
  fwd = make_plan(mask, TiledLayout((30, 27), (1, 2), (8, 16)), TiledLayout((30, 27), (1, 2), (8, 8)))
  bwd = ops._backward_plan(impl, mask, fwd, 16, jnp.float32, None)
  assert bwd is not None and bwd.gathered and bwd.block_q == 128 and bwd.block_kv == 64
  assert bwd.q_layout.tile_shape != fwd.q_layout.tile_shape or (
      bwd.kv_layout.tile_shape != fwd.kv_layout.tile_shape)
  # Explicit backward tiles in the config keep the forward's plan.
  assert ops._backward_plan(impl, mask, fwd, 16, jnp.float32, TritonConfig(dq_block_q=16)) is None
  p = dict(problem=problem, batch=1, heads=2, kv_heads=1, head_dim=16, dtype=jnp.float32,
           seed=4, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "triton", interpret=True)
