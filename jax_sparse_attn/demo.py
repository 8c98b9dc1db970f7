"""Demo on the default device: 2-D neighborhood attention and a causal sliding window,
each checked against the dense reference (forward and gradients), with timings; on a GPU
then the same two at real size (2-D NA 128x128 kernel 33, B=2, H=16, D=128; a causal window
of 2048 at S=32768) timed beside dense cuDNN attention, with the speedups.

    python -m jax_sparse_attn.demo [--size 32] [--seq 1024] [--no-real-size]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks


def time_ms(fn, *args, iters=10, repeats=3, warmup=1):
  """Median over `repeats` of the mean of `iters` back-to-back calls, in ms, after `warmup`
  calls. Dispatch is asynchronous, so host overhead overlaps device work as in training."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  means = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    means.append((time.perf_counter() - t) / iters)
  return float(np.median(means)) * 1e3


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check(name, run, ref, args, tol):
  out, want = run(*args), ref(*args)
  loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) * args[0].astype(jnp.float32)))
  grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(*args)
  grads_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(*args)
  errs = [_rel(out, want)] + [_rel(g, r) for g, r in zip(grads, grads_ref)]
  fwd_ms, bwd_ms = _fwd_bwd_ms(run, args)
  ok = all(e < tol for e in errs)
  print(f"{name:<44} fwd {fwd_ms:8.2f} ms  fwd+bwd {bwd_ms:8.2f} ms  "
        f"rel.err out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}  "
        f"{'OK' if ok else 'FAIL'}")
  return ok


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=32, help="2-D feature map side")
  parser.add_argument("--kernel", type=int, default=7)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--no-real-size", action="store_true",
                      help="skip the real-size timings beside cuDNN (GPU only)")
  args = parser.parse_args(argv)
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  backend = jsa.resolve_backend("auto", masks.full(), dtype=dtype, head_dim=64)
  tol = 2e-3 if dtype == jnp.float32 else 3e-2
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), backend={backend}, "
        f"dtype={jnp.dtype(dtype).name}")
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  ok = True

  s, k = args.size, args.kernel
  q, kk, v = (jax.random.normal(kx, (1, s, s, 4, 64), dtype) for kx in keys)
  sim = jsa.simulate((s, s), (k, k), block_q=64, block_kv=64)
  ok &= _check(f"na2d {s}x{s} kernel {k}x{k} (bound {sim.block_speedup_bound:.1f}x)",
               lambda a, b, c: jsa.na2d(a, b, c, k),
               lambda a, b, c: jsa.na2d(a, b, c, k, backend="reference"), (q, kk, v), tol)

  n, w = args.seq, args.window
  q, kk, v = (jax.random.normal(kx, (1, n, 4, 64), dtype) for kx in keys)
  mask = masks.sliding_window(w - 1)
  ok &= _check(f"causal sliding window {w}, seq {n}",
               lambda a, b, c: jsa.attention(a, b, c, mask),
               lambda a, b, c: jsa.attention(a, b, c, mask, backend="reference"), (q, kk, v), tol)
  if jax.default_backend() == "gpu" and not args.no_real_size:
    real_size()
  print("demo:", "all checks passed" if ok else "CHECK FAILED")
  raise SystemExit(0 if ok else 1)


def _fwd_bwd_ms(fn, args):
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
  return (time_ms(jax.jit(fn), *args), time_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *args))


def real_size():
  """The main job at real size on a GPU: ours beside dense cuDNN (bf16, D=128)."""
  print("\nreal size, bf16, D=128 (fwd / fwd+bwd ms; speedup over dense cuDNN):")
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  cudnn = lambda **kw: (lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn", **kw))
  flat = lambda f: (lambda q, k, v: f(*(x.reshape(x.shape[0], -1, *x.shape[-2:])
                                        for x in (q, k, v))))
  rows = []
  shape = (2, 128, 128, 16, 128)
  args = [jax.random.normal(kx, shape, jnp.bfloat16) for kx in keys]
  rows.append(("2-D NA 128x128 kernel 33, B=2 H=16", lambda q, k, v: jsa.na2d(q, k, v, 33),
               [("dense cuDNN", flat(cudnn()))], args))
  shape = (1, 32768, 16, 128)
  args = [jax.random.normal(kx, shape, jnp.bfloat16) for kx in keys]
  rows.append(("causal window 2048, S=32768, B=1 H=16",
               lambda q, k, v: jsa.attention(q, k, v, masks.sliding_window(2047)),
               [("dense causal cuDNN", cudnn(is_causal=True)),
                ("cuDNN sliding window", cudnn(is_causal=True, local_window_size=(2047, 0)))],
               args))
  for name, ours, peers, args in rows:
    f, b = _fwd_bwd_ms(ours, args)
    line = f"  {name:<40} ours {f:7.2f} / {b:7.2f}"
    for peer, fn in peers:
      pf, pb = _fwd_bwd_ms(fn, args)
      line += f" | {peer} {pf:7.2f} / {pb:7.2f} ({pf / f:.2f}x / {pb / b:.2f}x)"
    print(line, flush=True)


if __name__ == "__main__":
  main()
