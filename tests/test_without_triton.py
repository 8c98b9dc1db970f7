"""Without Pallas' Triton lowering (deprecated from jax 0.11; ``JSA_TRITON=0``, or a jax that
lacks `jax.experimental.pallas.triton`): the package imports, `auto` never picks `triton`,
the Hopper backend runs every mask forward and backward on its own kernels (what it left to
Triton's backward included: short 2-D windows, head_dim 32, padded neighborhoods, packed
grids), and asking for the Triton kernels is a ValueError that says why."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import backend_cases

from jax_sparse_attn import backends, masks
import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig, export_for_gpu, triton_attention
from pallas_kernels.gpu import mosaic_gpu as mgpu

S = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)


@pytest.fixture
def no_triton(monkeypatch):
  monkeypatch.setattr(triton_attention, "_DISABLED_BY_ENV", True)
  assert not triton_attention.available()


def _on_hopper(monkeypatch):
  monkeypatch.setattr(backends.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(mgpu, "is_hopper", lambda: True)


@pytest.mark.parametrize("triton", [True, False])
def test_auto_picks(monkeypatch, triton):
  """`auto` on a Hopper GPU: calls the Hopper kernels leave to Triton's (a short padded
  neighborhood's forward) go to them when Triton is gone; float32 (no Hopper kernel) goes to
  `xla` then, to `triton` with it; so does every call on another GPU."""
  _on_hopper(monkeypatch)
  if not triton:
    monkeypatch.setattr(triton_attention, "_DISABLED_BY_ENV", True)
  na = masks.neighborhood((32, 32), (7, 7))
  pick = lambda mask, dtype, d=128, segments=False: backends.resolve_backend(
      "auto", mask, dtype=dtype, head_dim=d, segments=segments)
  assert pick(na, jnp.bfloat16) == "mosaic_gpu"
  assert pick(na, jnp.bfloat16, segments=True) == ("triton" if triton else "mosaic_gpu")
  assert pick(masks.causal(), jnp.float32) == ("triton" if triton else "xla")
  monkeypatch.setattr(mgpu, "is_hopper", lambda: False)
  assert pick(masks.causal(), jnp.bfloat16) == ("triton" if triton else "xla")


def test_hopper_backward_everywhere(no_triton):
  """What `MosaicGPUConfig.backward=None` leaves to Triton's backward with it (short 2-D
  windows, strided 2-D ones, head_dim 32, packed grids) runs on the Hopper backward without
  it, and so do the backward's map blocks."""
  from jax_sparse_attn.layout import SequenceLayout, TiledLayout
  from jax_sparse_attn.plan import gathered, make_plan
  na = masks.neighborhood((32, 32), (7, 7))
  layout = TiledLayout((32, 32), (1, 1), (8, 16))
  plan = gathered(make_plan(na, layout, layout))
  assert mgpu.picks_mosaic(plan) and mgpu.picks_mosaic(plan, 32)
  assert mgpu.default_backward_map_blocks(128, jnp.bfloat16, None, na) == (128, 128)
  assert mgpu.default_backward_map_blocks(32, jnp.bfloat16, None, na) == (128, 128)
  from pallas_kernels.gpu.mosaic_gpu import config as mgpu_config
  assert mgpu_config.hopper_backward_neighborhood(na, 64, segments=True)
  packed = masks.packed_neighborhood([(16, 16), (8, 24)], 5)
  assert mgpu.picks_mosaic(make_plan(packed, SequenceLayout(448, 128), SequenceLayout(448, 128)))


@pytest.mark.parametrize("case", ["na2d_k7", "na2d_d32_padded", "na2d_strided", "packed"])
def test_lowers_without_triton(no_triton, case):
  """Forward and backward of calls whose backward is Triton's when it exists lower to Mosaic
  GPU kernels only (CUDA lowering on CPU)."""
  if case == "packed":
    shapes = [(16, 16), (8, 24)]
    f = lambda q, k, v: jsa.na_packed(q, k, v, shapes, 5, backend="mosaic_gpu")
    args = (S(1, 448, 2, 64),) * 3
  elif case == "na2d_d32_padded":
    valid = jnp.ones((1, 32, 32), bool).at[:, :, 28:].set(False)
    f = lambda q, k, v: jsa.na2d(q, k, v, 7, kv_valid=valid, backend="mosaic_gpu")
    args = (S(1, 32, 32, 2, 32),) * 3
  else:
    stride = 4 if case == "na2d_strided" else 1
    f = lambda q, k, v: jsa.na2d(q, k, v, 8 if stride > 1 else 7, stride=stride,
                                 backend="mosaic_gpu")
    args = (S(1, 32, 32, 2, 128),) * 3
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
  text = export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), *args).mlir_module()
  assert text.count("@mosaic_gpu_v2(") >= 2 and "__gpu$xla.gpu.triton" not in text


def test_packed_gradients_without_triton(no_triton):
  """The Hopper backward on packed grids (Triton's with it) against the float64 brute force,
  in interpret mode."""
  from test_na_extras import check_packed
  p = dict(shapes=[(9, 12), (6, 7)], problem=((3, 4), (1, 2), (2, 1), (False, True)),
           batch=1, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=3)
  check_packed(p, "mosaic_gpu", method="tiled", interpret=True)


def test_other_blocks_without_triton(no_triton, monkeypatch):
  """A plan of 64-key blocks at head_dim <= 128 trains only on Triton's backward: without it
  `auto` leaves Hopper for `xla`, and asking the Hopper backend for its gradient is a
  ValueError that names the block size (not a Triton error)."""
  _on_hopper(monkeypatch)
  assert backends.resolve_backend("auto", masks.causal(), dtype=jnp.bfloat16, head_dim=128,
                                  block_kv=64) == "xla"
  assert backends.resolve_backend("auto", masks.causal(), dtype=jnp.bfloat16, head_dim=128,
                                  block_kv=128) == "mosaic_gpu"
  monkeypatch.undo()
  monkeypatch.setattr(triton_attention, "_DISABLED_BY_ENV", True)
  S = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu",
                                               block_kv=64).astype(jnp.float32))
  with pytest.raises(ValueError, match="block_kv=64"):
    export_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), S, S, S)


def test_caller_tiles_of_64_keys(no_triton, monkeypatch):
  """`na` on tiles the caller chose whose KV blocks (64 keys) only Triton's backward takes:
  without it the Hopper backward gets a plan of its own 128-key blocks over the same tokens
  (`Backend.backward_runs`); gradients against the float64 brute force."""
  plans = backend_cases.spy_run_plans(monkeypatch)
  p = dict(problem=((12, 16), (5, 7), (1, 2), (1, 1), (True, False)), batch=1, heads=2,
           kv_heads=1, head_dim=64, dtype=jnp.bfloat16, seed=2, tile_q=(8, 16),
           tile_kv=(8, 8))
  backend_cases.check_na(p, "mosaic_gpu", interpret=True)
  assert plans and all(f.block_kv == 64 and b is not None and b.block_kv == 128
                       for f, b in plans)


def test_asking_for_triton_says_why(no_triton):
  x = jnp.zeros((1, 64, 2, 32), jnp.float32)
  with pytest.raises(ValueError, match="JSA_TRITON=0"):
    jsa.attention(x, x, x, masks.causal(), backend="triton", interpret=True)
  with pytest.raises(ValueError, match="JSA_TRITON=0"):
    y = x.astype(jnp.bfloat16)
    jsa.attention(y, y, y, masks.causal(), backend="mosaic_gpu", interpret=True,
                  config=MosaicGPUConfig(backward="triton"))


def test_jax_without_the_triton_lowering():
  """A jax whose `jax.experimental.pallas.triton` cannot be imported: the package imports and
  runs (`auto` on the CPU, the Hopper kernels in interpret mode), `backend="triton"` says
  what is missing."""
  script = textwrap.dedent("""
      import sys
      sys.modules["jax.experimental.pallas.triton"] = None  # import fails
      import jax, jax.numpy as jnp, numpy as np
      import jax_sparse_attn as jsa
      from jax_sparse_attn import masks
      from pallas_kernels.gpu import triton_attention
      assert triton_attention.plgpu is None and not triton_attention.available()
      x = jax.random.normal(jax.random.PRNGKey(0), (1, 100, 2, 32), jnp.float32)
      out = jsa.attention(x, x, x, masks.causal())
      want = jsa.attention(x, x, x, masks.causal(), backend="reference")
      np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
      try:
        jsa.attention(x, x, x, masks.causal(), backend="triton", interpret=True)
      except ValueError as e:
        assert "does not have" in str(e), e
      else:
        raise AssertionError("backend='triton' ran without the Triton lowering")
      print("ok")
      """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("JSA_TRITON", None)
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
