"""Lab tools: one question each, run on the device machine (`run_device.sh`)."""
import json
import math
import time

import jax
import jax.numpy as jnp


class Rows:
  """The rows of a diagnostic: `record(**row)` keeps the row and prints it as a JSON line
  (printed lines survive a call that runs past its time limit); `write(path)` saves them with
  the device."""

  def __init__(self):
    self.rows = []

  def record(self, **row):
    self.rows.append(row)
    print(json.dumps(row), flush=True)

  def write(self, path):
    if path:
      with open(path, "w") as f:
        json.dump({"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d"),
                   "rows": self.rows}, f, indent=1)


def max_rel_diff(grads, ref) -> float:
  """The largest relative L2 difference (float32) between matching arrays of two tuples."""
  return max(float(jnp.linalg.norm(g.astype(jnp.float32) - r.astype(jnp.float32))
                   / jnp.linalg.norm(r.astype(jnp.float32))) for g, r in zip(grads, ref))


def backward_inputs(plan, batch: int, n: int, heads: int, kv_heads: int, head_dim: int, cfg,
                    seed: int = 0):
  """Random bf16 q, k, v, dO [batch, n, heads | kv_heads, head_dim] (in the plan's token
  order) and the Hopper forward's out and lse on `plan`: the inputs of
  `attention_bwd.backward`."""
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd  # the lab's only GPU-kernel import
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, do = (jax.random.normal(x, (batch, n, heads, head_dim), jnp.bfloat16) for x in ks[:2])
  k, v = (jax.random.normal(x, (batch, n, kv_heads, head_dim), jnp.bfloat16) for x in ks[2:])
  scale = 1 / math.sqrt(head_dim)
  out, lse = jax.jit(lambda q, k, v: attention_fwd.forward(
      q, k, v, None, None, plan, scale, cfg, False))(q, k, v)
  return q, k, v, do, out, lse
