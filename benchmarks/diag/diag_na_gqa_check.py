"""2-D neighborhoods with GQA on the Hopper backward (the MMA bias in the dQ kernel), each case
in its own process under a time limit: gradients against float32 XLA. GPU interpret mode
deadlocks on these (a barrier wait in the dQ kernel with GQA and the bias, MHA and the element
test run); this asks whether the GPU does.

    python -m benchmarks.diag.diag_na_gqa_check --out x.json
"""
import argparse
import json
import subprocess
import sys

CASES = [  # (spatial, kernel, stride, causal, heads, kv_heads, head_dim, batch)
    ((12, 21), (5, 9), (2, 3), (True, False), 2, 1, 64, 1),
    ((12, 21), (5, 9), (2, 3), (True, False), 4, 2, 96, 1),
    ((64, 64), (13, 13), (1, 1), (False, False), 16, 4, 72, 2),
    ((128, 128), (33, 33), (1, 1), (False, False), 16, 4, 128, 2),
]


def child(i: int):
  import jax
  import jax.numpy as jnp
  import jax_sparse_attn as jsa
  from pallas_kernels.gpu import MosaicGPUConfig
  spatial, kernel, stride, causal, h, hkv, d, b = CASES[i]
  ks = jax.random.split(jax.random.PRNGKey(i), 4)
  q, do = (jax.random.normal(x, (b, *spatial, h, d), jnp.bfloat16) for x in ks[::3])
  k, v = (jax.random.normal(x, (b, *spatial, hkv, d), jnp.bfloat16) for x in ks[1:3])

  def loss(q, k, v, backend, **kw):
    o = jsa.na2d(q, k, v, kernel, stride=stride, is_causal=causal, backend=backend, **kw)
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
  cfg = MosaicGPUConfig(backward="mosaic_gpu")
  got = jax.jit(jax.grad(lambda *a: loss(*a, "mosaic_gpu", config=cfg), argnums=(0, 1, 2)))(
      q, k, v)
  want = jax.jit(jax.grad(lambda *a: loss(*a, "xla"), argnums=(0, 1, 2)))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  err = [round(float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w)), 5)
         for g, w in zip(got, want)]
  print(json.dumps({"case": str(CASES[i]), "rel_err_dq_dk_dv": err}), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", type=int, default=None)
  args = parser.parse_args()
  if args.child is not None:
    return child(args.child)
  rows = []
  for i in range(len(CASES)):
    try:
      r = subprocess.run([sys.executable, "-m", "benchmarks.diag.diag_na_gqa_check",
                          "--child", str(i)], capture_output=True, text=True, timeout=90)
      lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
      row = json.loads(lines[-1]) if lines else {"case": str(CASES[i]), "rc": r.returncode,
                                                 "tail": r.stderr[-800:]}
    except subprocess.TimeoutExpired:
      row = {"case": str(CASES[i]), "timeout_s": 90}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    json.dump({"rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
  main()
