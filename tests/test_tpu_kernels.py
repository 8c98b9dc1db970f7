"""Pallas TPU (Mosaic) kernels: interpret mode vs the brute force, and TPU lowering on CPU."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings

import backend_cases
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.tpu import export_for_tpu


@settings(max_examples=examples(3))
@given(p=backend_cases.seq_problems(max_len=150))
def test_attention_interpret(p):
  if p["mask"] == "or":
    p = dict(p, mask="function")
  backend_cases.check_attention(p, "mosaic", interpret=True)


@settings(max_examples=examples(2))
@given(p=backend_cases.na_problems())
def test_na_interpret(p):
  # Tiles must multiply to 128 on TPU: let the simulator choose them.
  p = dict(p, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic", interpret=True)


def test_gqa_segments_bf16_interpret():
  p = dict(batch=1, sq=200, skv=200, heads=4, kv_heads=2, head_dim=32, mask="causal_window",
           segments=True, dtype=jnp.bfloat16, seed=11)
  backend_cases.check_attention(p, "mosaic", interpret=True)


def test_array_rows_interpret():
  """`from_array` with rows of one run each (some empty) as row bounds, with segment ids."""
  p = dict(batch=1, sq=200, skv=200, heads=2, kv_heads=1, head_dim=32, mask="array_rows",
           segments=True, dtype=jnp.float32, seed=12)
  backend_cases.check_attention(p, "mosaic", interpret=True)


def test_array_runs_interpret():
  """`from_array` with rows of 1-3 runs: a union of row bounds, tested as intervals per term
  (`plan.intervals_per_term`), GQA."""
  p = dict(batch=1, sq=256, skv=256, heads=2, kv_heads=1, head_dim=32, mask="array_runs",
           segments=False, dtype=jnp.float32, seed=14)
  backend_cases.check_attention(p, "mosaic", interpret=True)
  mask = backend_cases.seq_mask("array_runs", 512, 512)  # and it lowers for the TPU
  shape = ((1, 512, 4, 128), jnp.bfloat16)
  f = lambda q, k, v: jsa.attention(q, k, v, mask, backend="mosaic")
  assert _custom_calls(_fwd_bwd(f), shape, shape, shape) == 3


def _custom_calls(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, dt) for s, dt in shapes]
  return export_for_tpu(fn, *args).mlir_module().count("tpu_custom_call")


def _fwd_bwd(f):
  return lambda *a: jax.grad(lambda *b: jnp.sum(f(*b).astype(jnp.float32)), (0, 1, 2))(*a)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("mask", ["causal", "window_segments"])
def test_lowers_for_tpu(head_dim, dtype, mask):
  q = ((2, 1000, 8, head_dim), dtype)
  kv = ((2, 1000, 2, head_dim), dtype)
  if mask == "causal":
    f = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic")
  else:
    seg = jnp.zeros((2, 1000), jnp.int32)
    f = lambda q, k, v: jsa.attention(q, k, v, masks.sliding_window(255), segment_ids=seg,
                                      backend="mosaic")
  assert _custom_calls(f, q, kv, kv) == 1
  assert _custom_calls(_fwd_bwd(f), q, kv, kv) == 3  # forward + dQ + dK/dV


@pytest.mark.parametrize("spatial, kernel, stride, dilation, causal", [
    ((300,), 31, 1, 1, True),
    ((32, 40), (7, 9), (2, 3), (2, 1), False),
    ((8, 16, 16), (3, 5, 5), 1, (1, 2, 1), (True, False, False)),
])
def test_na_lowers_for_tpu(spatial, kernel, stride, dilation, causal):
  shape = ((1,) + spatial + (4, 128), jnp.bfloat16)
  f = lambda q, k, v: jsa.na(q, k, v, kernel, stride, dilation, causal, backend="mosaic")
  assert _custom_calls(f, shape, shape, shape) == 1
  assert _custom_calls(_fwd_bwd(f), shape, shape, shape) == 3


def test_block_size_rule_is_explained():
  x = jnp.ones((1, 256, 2, 64))
  with pytest.raises(ValueError, match="multiple of 128"):
    jsa.attention(x, x, x, backend="mosaic", interpret=True, block_q=64)


def test_long_maps_run_in_chunks(monkeypatch):
  """A block map too large for scalar memory runs as several calls over its rows (query
  blocks for the forward and dQ, key blocks for dK/dV); the mask function sees global
  positions in every chunk. One block's rows over the budget is a ValueError."""
  from pallas_kernels.tpu import mosaic_attention
  # 300 tokens: 3 blocks of 128, map rows of 3 entries (20 bytes): one row per chunk.
  monkeypatch.setattr(mosaic_attention, "_SMEM_MAP_BUDGET", 24)
  chunks = mosaic_attention._chunks(jnp.zeros((3, 3), jnp.int32), jnp.zeros(3, jnp.int32),
                                    jnp.zeros(3, jnp.int32), False, "query")
  assert [(b0, n) for b0, n, _ in chunks] == [(0, 1), (1, 1), (2, 1)]
  p = dict(batch=1, sq=300, skv=300, heads=2, kv_heads=1, head_dim=32, mask="function",
           segments=True, dtype=jnp.float32, seed=5)
  backend_cases.check_attention(p, "mosaic", interpret=True)
  monkeypatch.setattr(mosaic_attention, "_SMEM_MAP_BUDGET", 16)
  x = jnp.ones((1, 300, 2, 32))
  with pytest.raises(ValueError, match=r"one query block's rows of the block map take \d+ bytes"):
    jsa.attention(x, x, x, masks.causal(), backend="mosaic", interpret=True)
