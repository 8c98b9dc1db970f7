"""What learned sink logits (`attention(..., sinks=)`) cost on the GPU: the LM layer, the
causal window and 2-D NA, forward and fwd+bwd without sinks, with sinks joined in the
kernels' epilogue (`Backend.sinks`) and with sinks joined after the kernel (the GPU
backends registered without the flag: the form before 2026-12-05), interleaved rounds; and
checks of the output, lse and every gradient (q, k, v and the sinks) on the Mosaic GPU and
Triton kernels against the float32 XLA backend.

    python -m benchmarks.diag.diag_sinks [--cases lm,window,na2d] [--out x.json]
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks

from . import interleaved
from ..bench_gpu import inputs, rel, rel_errors

LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
# name: (q shape, kv shape, fn(q, k, v, sinks, backend))
CASES = {
    "lm": ((2, 8192, 16, 128), (2, 8192, 4, 128),
           lambda q, k, v, s, be: jsa.attention(q, k, v, LM, sinks=s, backend=be)),
    "window": ((1, 32768, 16, 128), (1, 32768, 16, 128),
               lambda q, k, v, s, be: jsa.attention(
                   q, k, v, masks.causal() & masks.sliding_window(2047), sinks=s, backend=be)),
    "na2d": ((2, 128, 128, 16, 128), (2, 128, 128, 16, 128),
             lambda q, k, v, s, be: jsa.na2d(q, k, v, 33, sinks=s, backend=be)),
}


def _epilogue(on: bool, fn):
  """Register the GPU backends with (`on`) or without `Backend.sinks`; returns fn (traced
  after this, under that registration)."""
  from jax_sparse_attn import backends
  for name in ("mosaic_gpu", "triton"):
    backends.register_backend(name, backends.get_backend(name)._replace(sinks=on))
  return fn


def main():
  path = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
  rows = []
  sinks = jnp.asarray(np.random.default_rng(0).standard_normal(16), jnp.float32)
  # Gradient check at a smaller LM size: every gradient, the sinks' too.
  small = inputs((2, 2048, 16, 128), (2, 2048, 4, 128), jnp.bfloat16)
  loss = lambda be, *a: jnp.sum(CASES["lm"][2](*a, be).astype(jnp.float32)
                                * small[3].astype(jnp.float32))
  f32 = [x.astype(jnp.float32) for x in small[:3]]
  lm = lambda be: lambda q, k, v, s: jsa.attention(q, k, v, LM, sinks=s, backend=be,
                                                   return_lse=True)
  cases = (sys.argv[sys.argv.index("--cases") + 1].split(",") if "--cases" in sys.argv
           else list(CASES))
  if "lm" in cases:
    lm_out, lm_lse = jax.jit(lm("xla"))(*f32, sinks)
    want = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3)))(*f32, sinks)
  checks = {}
  if "na2d" in cases:  # 2-D NA k33 at 64x64 (the window boxes' forward)
    na_small = inputs((1, 64, 64, 16, 128), (1, 64, 64, 16, 128), jnp.bfloat16)
    na = lambda be: lambda q, k, v, s: jsa.na2d(q, k, v, 33, sinks=s, backend=be,
                                                return_lse=True)
    checks["na2d"] = (na, na_small, [x.astype(jnp.float32) for x in na_small[:3]])
  for case, (fn, args, args32) in checks.items():
    want_out, want_lse = jax.jit(fn("xla"))(*args32, sinks)
    for be in ("mosaic_gpu", "triton"):
      got_out, lse = jax.jit(fn(be))(*args[:3], sinks)
      row = {"check": f"{case} forward with sinks, {be} (bf16) vs xla (f32)",
             "rel_err": {"out": round(rel(got_out, want_out), 5),
                         "lse_max_abs": round(float(jnp.max(jnp.abs(lse - want_lse))), 5)}}
      print(json.dumps(row), flush=True)
      rows.append(row)
  for be in ("mosaic_gpu", "triton") if "lm" in cases else ():
    got_out, lse = jax.jit(lm(be))(*small[:3], sinks)
    got = jax.jit(jax.grad(lambda *a: loss(be, *a), argnums=(0, 1, 2, 3)))(*small[:3], sinks)
    row = {"check": f"LM layer S=2048 with sinks, {be} (bf16) vs xla (f32)",
           "rel_err": {"out": round(rel(got_out, lm_out), 5),
                       "lse_max_abs": round(float(jnp.max(jnp.abs(lse - lm_lse))), 5),
                       **rel_errors(got, want, ("dq", "dk", "dv", "d_sinks"), digits=5)}}
    print(json.dumps(row), flush=True)
    rows.append(row)
  for name, (qs, ks, fn) in CASES.items():
    if name not in cases:
      continue
    big = inputs(qs, ks, jnp.bfloat16)
    row = {"case": name, "q": qs, "kv": ks}
    interleaved(row, {"plain": lambda: _epilogue(True, lambda q, k, v: fn(q, k, v, None, "auto")),
                      "sinks": lambda: _epilogue(True, lambda q, k, v: fn(q, k, v, sinks, "auto")),
                      "sinks_after": lambda: _epilogue(
                          False, lambda q, k, v: fn(q, k, v, sinks, "auto"))}, big)
    print(json.dumps(row), flush=True)
    rows.append(row)
  _epilogue(True, None)
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": rows}
  if path:
    json.dump(result, open(path, "w"), indent=1)


if __name__ == "__main__":
  main()
