"""Interpret mode runs a Pallas kernel as XLA:CPU computations that call back into Python for
every memory access, copy and barrier (`io_callback`). jax 0.11.2's `io_callback_impl` first
`device_put`s every argument onto the CPU device: ~75% of a GPU interpret-mode kernel's time
on the CI machine (a 300-token fwd+bwd on the Hopper kernels: 6.6 s, 1.6 s without; the suite
19.2 -> 14.3 minutes). The interpreters' callbacks read their arguments as numpy (integer
scalars as Python ints), so `install` hands them numpy copies instead: the same results bit
for bit (`test_numpy_callbacks.py` checks it every run). Only on the jax it was
checked on; JSA_NUMPY_CALLBACKS=0 keeps jax's own."""
import contextlib
import functools
import inspect
import os

import jax
import numpy as np
from jax._src import callback, config, tree_util, xla_bridge

_JAX_IMPL = callback.io_callback_impl
_PARAMS = ["args", "result_avals", "callback", "sharding", "ordered"]


def _as_numpy(a):
  a = np.array(a)  # a copy, as device_put made: the callback may keep it past the call
  return a.item() if a.ndim == 0 and np.issubdtype(a.dtype, np.integer) else a


@functools.cache
def _cpu_device():
  return xla_bridge.local_devices(backend="cpu")[0]


def _numpy_impl(*args, result_avals, callback, sharding, ordered):
  del result_avals, sharding, ordered
  with config.default_device(_cpu_device()):  # as jax's: arrays a callback makes stay on the CPU
    return tree_util.tree_map(np.asarray, callback(*map(_as_numpy, args)))


def install() -> bool:
  """Replaces jax's io_callback_impl (looked up at call time by the lowering); False where
  turned off or on another jax."""
  if (os.environ.get("JSA_NUMPY_CALLBACKS", "1") == "0" or jax.__version__ != "0.11.2"
      or list(inspect.signature(_JAX_IMPL).parameters) != _PARAMS):
    return False
  callback.io_callback_impl = _numpy_impl
  return True


@contextlib.contextmanager
def jax_callbacks():
  """jax's own io_callback_impl inside the block."""
  current = callback.io_callback_impl
  callback.io_callback_impl = _JAX_IMPL
  try:
    yield
  finally:
    callback.io_callback_impl = current
