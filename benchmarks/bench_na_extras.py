"""Neighborhoods with extra tokens, padding masks and packed grids on the GPU: real-size
gradient checks and timings beside cuDNN and torch FlexAttention, in one run.

    python -m benchmarks.bench_na_extras --sections check,perf,flex --out results.json

check: gradients (bf16, `backend="auto"`) against the float32 XLA backend, relative L2 per
tensor. perf: a Flux-like text-to-image block (2-D NA 64x64 k17 + 512 text tokens, B=2 H=24
D=128): ours with extra tokens as a second pass merged by log-sum-exp (what `na` runs), the
same attention in one pass of the generic kernel (a `from_function` mask over the
concatenated keys), cuDNN dense over all keys, the text->all attention. masks: padding
masks and packed grids (`na_packed`'s methods) beside plain NA. flex: torch FlexAttention with the same mask (`mask_mod`:
neighborhood | text), in this process after the JAX timings.
"""
from __future__ import annotations

import argparse
import math
import os
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_sparse_attn as jsa  # noqa: E402
from jax_sparse_attn import masks  # noqa: E402

from .bench_gpu import (all_finite, fwd_bwd, header, inputs, perf_row, record,  # noqa: E402
                        rel_errors, write_results)

# (name, image grid, kernel, text tokens, batch, heads)
BLOCKS = [
    ("flux 64x64 k17 + 512 text", (64, 64), 17, 512, 2, 24),
    ("flux 128x128 k17 + 512 text", (128, 128), 17, 512, 1, 24),
    ("64x64 k17 + 77 text", (64, 64), 17, 77, 2, 24),
]
D = 128
SMOKE = False  # --smoke: tiny shapes, to run the script on a CPU


def _na_fn(spatial, kernel):
  """The neighborhood | text mask on [image tokens] x [image tokens, text tokens], as a
  jnp function of flat indices (NATTEN's clamped window, stride 1, dilation 1)."""
  h, w = spatial
  n = h * w

  def fn(q, k):
    is_text = k >= n
    kc = jnp.minimum(k, n - 1)
    start = lambda c, size: jnp.clip(c - kernel // 2, 0, size - kernel)
    sh, sw = start(q // w, h), start(q % w, w)
    kh, kw = kc // w, kc % w
    inside = (kh >= sh) & (kh < sh + kernel) & (kw >= sw) & (kw < sw + kernel)
    return is_text | inside
  return fn


def _check(name, fn, args, do):
  try:
    got = fwd_bwd(lambda *x: fn("auto", *x))(*args, do)
    f32 = [x.astype(jnp.float32) for x in args]
    want = fwd_bwd(lambda *x: fn("xla", *x))(*f32, do.astype(jnp.float32))
    names = ["out", "dq", "dk", "dv", "d_extra_k", "d_extra_v"]
    record(section="check", case=name, finite=all_finite(got), **rel_errors(got, want, names))
  except Exception as e:
    record(section="check", case=name, error=repr(e)[:600])
    traceback.print_exc()


def section_check(dtype):
  b, h = 1, 4
  rng = np.random.default_rng(0)
  shape = (b, 48, 64, h, D)
  q, k, v, do = inputs(shape, shape, dtype)
  ek, ev, _, _ = inputs((b, 77, h, D), (b, 77, h, D), dtype, seed=1)
  text_valid = jnp.asarray(np.arange(77)[None] < 60)
  _check("na2d 48x64 k13 + 77 text (60 valid)",
         lambda be, q, k, v, ek, ev: jsa.na2d(q, k, v, 13, additional_keys=ek,
                                              additional_values=ev, additional_valid=text_valid,
                                              backend=be),
         (q, k, v, ek, ev), do)
  valid = np.ones((b, 48, 64), bool)
  valid[:, 30:, :] = False  # bottom padding: covers whole windows
  valid &= rng.random((b, 48, 64)) < 0.9
  seg = jnp.asarray((np.arange(64)[None, None] >= 40) * np.ones((b, 48, 1), np.int32))
  _check("na2d 48x64 k13 kv_valid (padding rows) + segment ids",
         lambda be, q, k, v: jsa.na2d(q, k, v, 13, kv_valid=jnp.asarray(valid),
                                      segment_ids=seg, backend=be),
         (q, k, v), do)
  shapes = [(64, 64), (48, 80), (32, 40)]
  n = sum(math.prod(s) for s in shapes)
  q, k, v, do = inputs((b, n, h, D), (b, n, h, D), dtype, seed=2)
  _check("na_packed 64x64 + 48x80 + 32x40 k13",
         lambda be, q, k, v: jsa.na_packed(q, k, v, shapes, 13, backend=be), (q, k, v), do)
  shape3 = (b, 8, 32, 32, h, D)
  q, k, v, do = inputs(shape3, shape3, dtype, seed=3)
  _check("na3d 8x32x32 k4x8x8 + 64 text",
         lambda be, q, k, v, ek, ev: jsa.na3d(q, k, v, (4, 8, 8), additional_keys=ek,
                                              additional_values=ev, backend=be),
         (q, k, v, ek[:, :64], ev[:, :64]), do)


def section_perf(dtype, iters):
  for name, spatial, kernel, n_text, b, h in BLOCKS:
    n = math.prod(spatial)
    shape = (b, *spatial, h, D)
    q, k, v, do = inputs(shape, shape, dtype)
    ek, ev, tq, tdo = inputs((b, n_text, h, D), (b, n_text, h, D), dtype, seed=1)
    pairs = n * (kernel * kernel + n_text)
    flops = 4 * b * h * D * pairs  # the attended pairs (PERF.md: fwd 4*b*h*d*pairs)
    extra = dict(useful_fwd_tflop=flops / 1e12)
    perf_row("perf", name, "ours two-pass (na2d additional_keys)",
             lambda q, k, v, ek, ev: jsa.na2d(q, k, v, kernel, additional_keys=ek,
                                              additional_values=ev),
             (q, k, v, ek, ev), do, iters, **extra)
    perf_row("perf", name, "ours na2d only", lambda q, k, v: jsa.na2d(q, k, v, kernel),
             (q, k, v), do, iters)
    flat = lambda x: x.reshape(b, n, *x.shape[-2:])
    perf_row("perf", name, "ours text pass only", lambda q, k, v: jsa.attention(q, k, v),
             (flat(q), ek, ev), flat(do), iters)
    cat = lambda a, c: jnp.concatenate([flat(a), c], axis=1)
    if n <= 4096:  # its block map evaluates the function on every pair on the host
      mask = masks.from_function(_na_fn(spatial, kernel))
      perf_row("perf", name, "ours one-pass (from_function mask, raster order)",
               lambda q, k, v, ek, ev: jsa.attention(flat(q), cat(k, ek), cat(v, ev), mask),
               (q, k, v, ek, ev), flat(do), iters, **extra)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation=None if SMOKE else "cudnn")
    perf_row("perf", name, "cudnn dense over all keys",
             lambda q, k, v, ek, ev: cudnn(flat(q), cat(k, ek), cat(v, ev)),
             (q, k, v, ek, ev), flat(do), iters, **extra)
    # The reverse direction: text queries attend to every image and text token.
    perf_row("perf", name + " text->all", "ours attention (dense)",
             lambda tq, k, v, ek, ev: jsa.attention(tq, cat(k, ek), cat(v, ev)),
             (tq, k, v, ek, ev), tdo, iters)
    perf_row("perf", name + " text->all", "cudnn",
             lambda tq, k, v, ek, ev: cudnn(tq, cat(k, ek), cat(v, ev)),
             (tq, k, v, ek, ev), tdo, iters)


def section_masks(dtype, iters):
  """Padding masks and packed grids beside plain NA (same kernels, plus the segment test)."""
  b, h, g, kern = (1, 2, 24, 5) if SMOKE else (2, 16, 96, 17)
  shape = (b, g, g, h, D)
  q, k, v, do = inputs(shape, shape, dtype, seed=4)
  valid = jnp.asarray(np.arange(g)[None, None, :] < g - g // 6) & jnp.ones((b, g, 1), bool)
  name = f"na2d {g}x{g} k{kern} B={b} H={h}"
  perf_row("perf", name, "ours plain", lambda q, k, v: jsa.na2d(q, k, v, kern), (q, k, v), do,
           iters)
  for backend in ("auto", "triton"):
    perf_row("perf", name, f"ours kv_valid ({g // 6} padded columns) backend={backend}",
             lambda q, k, v, be=backend: jsa.na2d(q, k, v, kern, kv_valid=valid, backend=be),
             (q, k, v), do, iters)
  perf_row("perf", name, "ours plain backend=triton",
           lambda q, k, v: jsa.na2d(q, k, v, kern, backend="triton"), (q, k, v), do, iters)
  shapes = [(24, 24), (16, 32), (12, 12)] if SMOKE else [(96, 96), (64, 128), (48, 48)]
  n = sum(math.prod(s) for s in shapes)
  q, k, v, do = inputs((b, n, h, D), (b, n, h, D), dtype, seed=5)
  name = f"packed {' + '.join('x'.join(map(str, s)) for s in shapes)} k{kern} B={b} H={h}"
  for method in ("per_grid", "tiled", "raster"):
    perf_row("perf", name, f"ours na_packed method={method}",
             lambda q, k, v, m=method: jsa.na_packed(q, k, v, shapes, kern, method=m),
             (q, k, v), do, iters)
  perf_row("perf", name, "cudnn dense over all tokens (no mask)",
           lambda q, k, v: jax.nn.dot_product_attention(
           q, k, v, implementation=None if SMOKE else "cudnn"), (q, k, v), do, iters)
  # Many small grids (images of several resolutions in one batch): where one kernel call
  # over every grid should beat one call per grid.
  rng = np.random.default_rng(0)
  sizes = (8, 16) if SMOKE else (32, 48, 64)
  shapes = [tuple(int(x) for x in rng.choice(sizes, 2)) for _ in range(16)]
  n = sum(math.prod(s) for s in shapes)
  q, k, v, do = inputs((b, n, h, D), (b, n, h, D), dtype, seed=6)
  name = (f"packed 16 grids, sides from {sizes} ({n} tokens) k{kern - 4} B={b} H={h}")
  for method in ("per_grid", "tiled"):
    perf_row("perf", name, f"ours na_packed method={method}",
             lambda q, k, v, m=method: jsa.na_packed(q, k, v, shapes, kern - 4, method=m),
             (q, k, v), do, iters)


def section_flex(iters):
  try:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import triton.testing as tt
  except Exception as e:
    record(section="flex", error=repr(e)[:300])
    return
  flex = torch.compile(flex_attention, dynamic=False)
  for name, (hh, ww), kernel, n_text, b, h in BLOCKS:
    try:
      n = hh * ww

      def mask_mod(bi, hi, qi, ki, n=n, hh=hh, ww=ww, kernel=kernel):
        is_text = ki >= n
        kc = torch.clamp(ki, max=n - 1)
        sh = torch.clamp(qi // ww - kernel // 2, 0, hh - kernel)
        sw = torch.clamp(qi % ww - kernel // 2, 0, ww - kernel)
        kh, kw = kc // ww, kc % ww
        return is_text | ((kh >= sh) & (kh < sh + kernel) & (kw >= sw) & (kw < sw + kernel))
      bm = create_block_mask(mask_mod, None, None, n, n + n_text, device="cuda")
      mk = lambda s: torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16,
                                 requires_grad=True)
      q, k, v = mk(n), mk(n + n_text), mk(n + n_text)
      do = torch.randn_like(q)
      fwd = tt.do_bench(lambda: flex(q, k, v, block_mask=bm))

      def fb():
        flex(q, k, v, block_mask=bm).backward(do)
      record(section="perf", case=name, impl="torch flex (mask_mod nbhd | text)", fwd_ms=fwd,
             fwd_bwd_ms=tt.do_bench(fb), block_sparsity_pct=bm.sparsity())
      q = k = v = do = bm = None  # (the closures hold cells: free the tensors)
      torch.cuda.empty_cache()
    except Exception as e:
      record(section="perf", case=name, impl="torch flex", error=repr(e)[:600])
      traceback.print_exc()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sections", default="check,perf,masks,flex")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out", default=None)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
  args = parser.parse_args(argv)
  global SMOKE, BLOCKS
  if args.smoke:
    SMOKE, BLOCKS = True, [("smoke 16x16 k5 + 16 text", (16, 16), 5, 16, 1, 2)]
  dtype = jnp.dtype(args.dtype)
  head = header(args.dtype)
  record(**head)
  sections = args.sections.split(",")
  if "check" in sections:
    section_check(dtype)
  if "perf" in sections:
    section_perf(dtype, args.iters)
  if "masks" in sections:
    section_masks(dtype, args.iters)
  if "flex" in sections:
    section_flex(args.iters)
  write_results(args.out, head)


if __name__ == "__main__":
  main()
