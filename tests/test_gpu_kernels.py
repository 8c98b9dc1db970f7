"""Pallas Triton kernels in interpret mode (CPU) vs the float64 brute force."""
import jax.numpy as jnp
import pytest
from hypothesis import given, settings

import backend_cases
import jax_sparse_attn as jsa
from pallas_kernels.gpu import TritonConfig

KW = dict(interpret=True, block_q=32, block_kv=32)


@settings(max_examples=8)
@given(p=backend_cases.seq_problems(max_len=70))
def test_attention(p):
  if p["mask"] == "or":  # generic masks: covered by the function case below (slow in interpret)
    p = dict(p, mask="function")
  backend_cases.check_attention(p, "triton", **KW)


@settings(max_examples=5)
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
