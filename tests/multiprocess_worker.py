"""One process of `test_multiprocess.py`: 2 processes x 2 CPU devices, one global mesh.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT

Runs ring, halo and content-routed (all-gather) attention (forward and dQ) over the 4
devices of both processes and compares them with this process's single-device result.
Prints "ok" lines; exits non-zero on a mismatch.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 2 devices a process, beside the flags it was given (the suite's: tests/test_multiprocess.py).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                           process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_sparse_attn as jsa  # noqa: E402
from jax_sparse_attn import masks, routing  # noqa: E402

assert jax.device_count() == 2 * num_processes, jax.devices()
mesh = jax.make_mesh((jax.device_count(),), ("context",),
                     axis_types=(jax.sharding.AxisType.Auto,))


def global_array(x, spec):
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def check(name, op, shapes, spec):
  rng = np.random.default_rng(0)  # the same inputs in every process
  q, k, v, d_out = (rng.standard_normal(s).astype(np.float32) for s in shapes)

  def loss(q, k, v):
    return jnp.sum(op(q, k, v, True) * d_out)

  sharded = jax.jit(jax.value_and_grad(loss))
  value, dq = sharded(*(global_array(x, spec) for x in (q, k, v)))
  dq = multihost_utils.process_allgather(dq, tiled=True)
  want_value, want_dq = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(op(q, k, v, False) * d_out)))(q, k, v)
  err = float(np.abs(np.asarray(dq) - np.asarray(want_dq)).max())
  assert abs(float(value) - float(want_value)) < 1e-3 * abs(float(want_value)) + 1e-3, name
  assert err < 1e-4, (name, err)
  print(f"ok {name} process {process_id}: loss {float(value):.4f}, max dq error {err:.2e}",
        flush=True)


for strategy, mask in (("ring", masks.causal()), ("halo", masks.sliding_window(24, 8))):
  check(strategy, lambda q, k, v, on_mesh, mask=mask, strategy=strategy: jsa.attention(
      q, k, v, mask, backend="xla", **(dict(mesh=mesh, context_axis="context",
                                            strategy=strategy) if on_mesh else {})),
        [(2, 128, 4, 16), (2, 128, 2, 16), (2, 128, 2, 16), (2, 128, 4, 16)],
        P(None, "context"))
check("halo 3-D", lambda q, k, v, on_mesh: jsa.na(
    q, k, v, (3, 3, 5), is_causal=(True, False, False), backend="xla",
    **(dict(mesh=mesh, context_axis="context", strategy="halo") if on_mesh else {})),
      [(1, 8, 4, 6, 2, 16)] * 4, P(None, "context"))
ids = np.random.default_rng(1).integers(-1, 8, (2, 4, 8, 3)).astype(np.int32)
check("allgather MoBA", lambda q, k, v, on_mesh: jsa.attention(
    q, k, v, masks.causal(), block_selection=routing.BlockSelection(jnp.asarray(ids), 16),
    backend="xla", **(dict(mesh=mesh, context_axis="context") if on_mesh else {})),
      [(2, 128, 4, 16), (2, 128, 2, 16), (2, 128, 2, 16), (2, 128, 4, 16)], P(None, "context"))
jax.distributed.shutdown()
