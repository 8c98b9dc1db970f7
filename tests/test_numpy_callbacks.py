"""The suite's interpret-mode speed-up (tests/numpy_callbacks.py) changes no result: the
Hopper and TPU kernels' outputs and gradients with numpy callback arguments equal jax's own
bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import callback

import backend_cases
import numpy_callbacks
import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig


@pytest.mark.parametrize("backend", ["mosaic_gpu", "mosaic"])
def test_numpy_callbacks_change_nothing(backend):
  if callback.io_callback_impl is not numpy_callbacks._numpy_impl:
    pytest.skip("not installed (JSA_NUMPY_CALLBACKS=0 or another jax)")
  p = dict(batch=1, sq=200, skv=200, heads=2, kv_heads=1, head_dim=64, mask="window_sink",
           segments=False, dtype=jnp.bfloat16, seed=2)
  q, k, v, d_out, _ = backend_cases.make_inputs(p)
  mask = backend_cases.seq_mask("window_sink", 200, 200)
  config = MosaicGPUConfig(backward="mosaic_gpu") if backend == "mosaic_gpu" else None
  run = lambda q, k, v: jsa.attention(q, k, v, mask, backend=backend, interpret=True,
                                      config=config, return_lse=True)
  fast = backend_cases.outputs_and_grads(run, d_out, q, k, v)
  with numpy_callbacks.jax_callbacks():
    assert callback.io_callback_impl is not numpy_callbacks._numpy_impl
    slow = backend_cases.outputs_and_grads(run, d_out, q, k, v)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert float(jnp.abs(fast[1][1].astype(jnp.float32)).sum()) > 0  # dK is not all zero
