"""`logits_soft_cap` (Gemma 2's c·tanh(s / c)) in the kernel backends against the capped
float64 brute force: Triton, Mosaic GPU (both backward forms, the MMA bias, the role-split
kernels) and TPU Mosaic in interpret mode, and their lowering. The `reference` and `xla`
backends, the op's paths, meshes and modules: test_ops, test_context_parallel, test_nn."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_cases
from strategies import examples
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.gpu import MosaicGPUConfig, export_for_gpu
from pallas_kernels.tpu import export_for_tpu

BWD = MosaicGPUConfig(backward="mosaic_gpu")


@settings(max_examples=examples(3))
@given(p=backend_cases.seq_problems(max_len=70), cap=st.sampled_from([0.5, 2.0]))
def test_triton(p, cap):
  """`logits_soft_cap` in the Triton kernels against the capped brute force."""
  if p["mask"] == "or":
    p = dict(p, mask="function")
  backend_cases.check_attention(p, "triton", logits_soft_cap=cap, interpret=True, block_q=32,
                                block_kv=32)


def test_triton_na():
  """`logits_soft_cap` with the neighborhood kernels' MMA bias (its masked scores stay
  masked under the cap: `softcap.FLOOR`), stride and a causal dim."""
  p = dict(problem=((12, 21), (5, 9), (2, 3), (1, 1), (True, False)), batch=1, heads=2,
           kv_heads=1, head_dim=32, dtype=jnp.float32, seed=4, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "triton", interpret=True, logits_soft_cap=1.0)


@pytest.mark.parametrize("case", ["two_kernels", "fused", "na", "wide"])
def test_mosaic_gpu(case):
  """`logits_soft_cap` in the Hopper forward and backward kernels (dK/dV and dQ as two
  kernels, or dQ fused; a neighborhood with the MMA bias, whose masked scores stay masked
  under the cap; head_dim 256's role-split kernels, whose dS warpgroup takes the slope
  from P) against the capped brute force."""
  if case == "wide":
    p = dict(batch=1, sq=100, skv=100, heads=2, kv_heads=1, head_dim=256, mask="masked_rows",
             segments=False, dtype=jnp.bfloat16, seed=5)  # rows that see nothing: lse₂ = +inf
    backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=BWD,
                                  logits_soft_cap=1.5)
    return
  if case == "na":
    p = dict(problem=((12, 21), (5, 9), (2, 3), (1, 1), (True, False)), batch=1, heads=2,
             kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=4, tile_q=None, tile_kv=None)
    backend_cases.check_na(p, "mosaic_gpu", interpret=True, config=BWD, logits_soft_cap=1.0)
    return
  fused = case == "fused"
  p = dict(batch=1, sq=200, skv=200, heads=4, kv_heads=2, head_dim=128 if fused else 64,
           mask="window_sink" if fused else "causal", segments=not fused,
           dtype=jnp.bfloat16, seed=5)
  config = MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split" if fused else "kernel")
  backend_cases.check_attention(p, "mosaic_gpu", interpret=True, config=config,
                                logits_soft_cap=1.5)


def test_mosaic_gpu_lowers():
  """With `logits_soft_cap` the forward and backward lower to Mosaic GPU kernels (no Triton)
  at head_dim 128 and at 256 (the role-split kernels: `attention_bwd_wide._cap_slope`)."""
  def lowered(d):
    S = jax.ShapeDtypeStruct((1, 1024, 4, d), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jsa.attention(
        q, k, v, masks.causal() & masks.sliding_window(300), backend="mosaic_gpu",
        logits_soft_cap=30.0).astype(jnp.float32))
    return export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S, S, S).mlir_module()
  text = lowered(128)
  assert "@mosaic_gpu_v2(" in text and "__gpu$xla.gpu.triton" not in text
  text = lowered(256)
  assert text.count("@mosaic_gpu_v2(") == 3 and "__gpu$xla.gpu.triton" not in text


def test_tpu():
  """`logits_soft_cap` in the TPU kernels (interpret mode) against the capped brute force:
  GQA, segment ids and a union with sinks; a 2-D neighborhood; and the TPU lowering."""
  p = dict(batch=1, sq=256, skv=256, heads=4, kv_heads=2, head_dim=64, mask="window_sink",
           segments=True, dtype=jnp.float32, seed=5)
  backend_cases.check_attention(p, "mosaic", interpret=True, logits_soft_cap=1.5)
  p = dict(problem=((12, 21), (5, 9), (2, 3), (1, 1), (True, False)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.float32, seed=4, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic", interpret=True, logits_soft_cap=1.0)
  f = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic",
                                    logits_soft_cap=30.0)
  S = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), (0, 1, 2))
  assert export_for_tpu(grad, S, S, S).mlir_module().count("tpu_custom_call") == 3
