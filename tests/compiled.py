"""Run a Flax module, a module's gradient or a function as one jitted program.

Eager (op-by-op) dispatch compiles every primitive as its own XLA program, ~35 ms each on
the CI machine: a module test run eagerly spent most of its time compiling hundreds of tiny
programs (docs/performance.md, "Where the CI suite's time goes"). These helpers keep a
test's checks the same and compile each call once.
"""
import jax
from flax import nnx


def call(module, *args, **kwargs):
  """``module(*args, **kwargs)`` under ``nnx.jit``; keyword arguments that are not arrays
  (flags such as ``is_causal``) stay Python values."""
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  fixed = {k: v for k, v in kwargs.items() if k not in arrays}
  return nnx.jit(lambda m, *a, **k: m(*a, **k, **fixed))(module, *args, **arrays)


def grad(loss, **grad_kwargs):
  """``nnx.grad(loss)`` under ``nnx.jit``: gradients w.r.t. the module (first argument)."""
  return nnx.jit(nnx.grad(loss, **grad_kwargs))


def run(fn, *args):
  """``fn(*args)`` under ``jax.jit`` (arrays as arguments, not folded constants)."""
  return jax.jit(fn)(*args)
