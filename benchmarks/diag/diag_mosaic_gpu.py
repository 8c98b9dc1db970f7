"""The Hopper forward (backend="mosaic_gpu") on the GPU: correctness at real sizes (forward
and gradients vs the float32 XLA backend), then forward (and forward+backward) timings beside
the Triton kernels in the same process. Prints JSON lines; `--out` also writes them. `--split`: per-warpgroup KV lists against
one list per tile on the same tiles (`split_timings`). `--rows`: where short rows lose
against the bound (`rows`), the HBM bandwidth, the dense baselines. `--windows`:
window-anchored KV boxes against grid tiles (`window_checks`, `window_timings`).

    PYTHONPATH=. python -m benchmarks.diag.diag_mosaic_gpu --out results.json
"""
import argparse
import math
import traceback

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from benchmarks.bench_gpu import (check_case, fwd_bwd, header, inputs, record, rel, timeit,
                                  write_results)
from jax_sparse_attn import masks, simulate
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import boxes as mg_boxes
from pallas_kernels.gpu.mosaic_gpu import cost as mg_cost

H, D = 16, 128


def checks(dtype):
  tol = 2e-2
  cases = [
      ("na2d 64x64 k13", (64, 64), (13, 13), 1, 1, False, 8),
      ("na2d 100x90 k(33,17) odd (TMA edges)", (100, 90), (33, 17), 1, 1, False, 8),
      ("na3d 8x24x24 k(4,7,7) causal-t", (8, 24, 24), (4, 7, 7), 1, 1, (True, False, False), 8),
      ("na2d 48x40 k(7,9) s(2,3) d(2,1) (permuted)", (48, 40), (7, 9), (2, 3), (2, 1), False, 8),
  ]
  for name, spatial, kern, stride, dil, causal, h in cases:
    q, k, v, do = inputs((1,) + spatial + (h, D), (1,) + spatial + (h, D), dtype)
    args = (kern, stride, dil, causal)
    ref = lambda q, k, v, a=args: jsa.na(q, k, v, *a, backend="xla")
    for variant, cfg in (("", None), (" unfused P·V (interpret form)",
                                      MosaicGPUConfig(fused_pv=False)),
                         (" element masks", MosaicGPUConfig(mask_mma=False)),
                         (" row copies", MosaicGPUConfig(box_copies=False)),
                         (" one program per item", MosaicGPUConfig(persistent=False))):
      ours = lambda q, k, v, a=args, cfg=cfg: jsa.na(q, k, v, *a, backend="mosaic_gpu",
                                                     config=cfg)
      try:
        check_case("mosaic_gpu " + name + variant, ours, ref, q, k, v, do, tol)
      except Exception as e:  # keep going
        record(suite="check", case=name + variant, error=repr(e)[:800])
        traceback.print_exc()
  for name, mask, h, hkv, d, s in [
      ("causal GQA 16/4 S=4096 D=64", masks.causal(), 16, 4, 64, 4096),
      ("window 512 S=8191 D=96 (odd, padded D)", masks.sliding_window(511), 8, 8, 96, 8191)]:
    q, k, v, do = inputs((2, s, h, d), (2, s, hkv, d), dtype)
    ours = lambda q, k, v, m=mask: jsa.attention(q, k, v, m, backend="mosaic_gpu")
    ref = lambda q, k, v, m=mask: jsa.attention(q, k, v, m, backend="xla", block_q=128,
                                                block_kv=128)
    try:
      check_case("mosaic_gpu " + name, ours, ref, q, k, v, do, tol)
    except Exception as e:
      record(suite="check", case=name, error=repr(e)[:800])
      traceback.print_exc()


def perf(name, fn, q, k, v, do, iters, with_bwd=False, **extra):
  try:
    r = dict(suite="mgpu", case=name, fwd_ms=timeit(jax.jit(fn), q, k, v, iters=iters), **extra)
    if with_bwd:
      r["fwd_bwd_ms"] = timeit(fwd_bwd(fn), q, k, v, do, iters=iters)
    record(**r)
  except Exception as e:
    record(suite="mgpu", case=name, error=repr(e)[:800], **extra)
    traceback.print_exc()


# Scheduling variants of the mosaic_gpu forward, timed beside the default.
SCHEDULES = [("one program per item", MosaicGPUConfig(persistent=False)),
             ("one program per item, numbered order",
              MosaicGPUConfig(persistent=False, longest_first=False)),
             ("persistent, numbered order", MosaicGPUConfig(longest_first=False))]


def IMPLS():
  return ("mosaic_gpu",) if ARGS.only_mgpu else ("mosaic_gpu", "triton")


def timings(dtype, iters):
  """Default tiles on both backends, then mosaic_gpu scheduling variants (forward only)."""
  for spatial, kern, stride, b in [
      ((128, 128), (33, 33), 1, 2),
      ((16, 64, 64), (8, 16, 16), 1, 1),
      ((16, 64, 64), (8, 16, 16), (8, 16, 16), 1),
      ((16, 64, 64), (8, 16, 16), (4, 8, 8), 1),
      ((128, 128), (16, 16), (16, 16), 2),
      ((128, 128), (16, 16), (8, 8), 2),
  ]:
    if ARGS.only_dense:
      break
    tag = (f"na{len(spatial)}d {'x'.join(map(str, spatial))} k{'x'.join(map(str, kern))} "
           f"s{stride} B={b}")
    q, k, v, do = inputs((b,) + spatial + (H, D), (b,) + spatial + (H, D), dtype)
    for impl in IMPLS():
      f = lambda q, k, v, impl=impl: jsa.na(q, k, v, kern, stride, backend=impl)
      perf(tag, f, q, k, v, do, iters, with_bwd=True, impl=impl + " (auto tiles)")
    for sched, cfg in SCHEDULES if not ARGS.only_mgpu else ():
      f = lambda q, k, v, cfg=cfg: jsa.na(q, k, v, kern, stride, backend="mosaic_gpu",
                                          config=cfg)
      perf(tag, f, q, k, v, do, iters, impl="mosaic_gpu", schedule=sched)
    write_results(ARGS.out, header())
  if ARGS.skip_dense:
    return
  for s, mask, b in [(16384, None, 2), (16384, masks.causal(), 2),
                     (32768, masks.sliding_window(2047), 1)]:
    q, k, v, do = inputs((b, s, H, D), (b, s, H, D), dtype)
    name = f"{'dense' if mask is None else mask} S={s} B={b}"
    for impl in IMPLS():
      perf(name, lambda q, k, v, m=mask, impl=impl: jsa.attention(q, k, v, m, backend=impl),
           q, k, v, do, iters, with_bwd=True, impl=impl)
    for sched, cfg in SCHEDULES if not ARGS.only_mgpu else ():
      perf(name, lambda q, k, v, m=mask, cfg=cfg: jsa.attention(
          q, k, v, m, backend="mosaic_gpu", config=cfg), q, k, v, do, iters,
           impl="mosaic_gpu", schedule=sched)
    write_results(ARGS.out, header())


def baselines(dtype, iters, extra=()):
  """Dense forwards the sparse rows' speedups are taken over (the token counts of the 2-D and
  3-D problems, and `extra` (tokens, batch) pairs)."""
  for n, b in [(16384, 2), (65536, 1), *extra]:
    q, k, v, do = inputs((b, n, H, D), (b, n, H, D), dtype)
    for impl in ("mosaic_gpu", "triton"):
      f = lambda q, k, v, impl=impl: jsa.attention(q, k, v, backend=impl)
      ms = timeit(jax.jit(f), q, k, v, iters=iters)
      record(suite="dense baseline", case=f"dense {n} tokens B={b}", impl=impl, fwd_ms=ms,
             fwd_tflops=4 * b * H * n * n * D / ms / 1e9)
    write_results(ARGS.out, header())


def split_checks(dtype):
  """Per-warpgroup KV lists (`MosaicGPUConfig.split`): forward and lse vs the float32 XLA
  backend at real sizes, split forced and by default."""
  for name, spatial, kern, stride, causal, qt, kt in [
      ("na2d 128x128 k33", (128, 128), (33, 33), 1, False, (16, 8), (8, 8)),
      ("na2d 100x90 k(33,17) odd", (100, 90), (33, 17), 1, False, (16, 8), (8, 8)),
      ("na3d 8x24x24 k(4,7,7) causal-t", (8, 24, 24), (4, 7, 7), 1, (True, False, False),
       (4, 4, 8), (2, 4, 8)),
      ("na3d 16x32x32 k8x16x16 s(4,8,8)", (16, 32, 32), (8, 16, 16), (4, 8, 8), False,
       (4, 4, 8), (2, 4, 8)),
  ]:
    q, k, v, _ = inputs((1,) + spatial + (8, D), (1,) + spatial + (8, D), dtype)
    want, want_lse = jsa.na(*(x.astype(jnp.float32) for x in (q, k, v)), kern, stride,
                            is_causal=causal, backend="xla", return_lse=True)
    for split in (True, None):
      try:
        got, lse = jax.jit(lambda q, k, v: jsa.na(
            q, k, v, kern, stride, is_causal=causal, backend="mosaic_gpu", q_tile_shape=qt,
            kv_tile_shape=kt, config=MosaicGPUConfig(split=split), return_lse=True))(q, k, v)
        err, err_lse = rel(got, want), rel(lse, want_lse)
        nan = bool(jnp.isnan(got).any())
        record(suite="check", case=name, split=split, err_out=err, err_lse=err_lse,
               nan=nan, ok=(not nan) and err < 2e-2 and err_lse < 1e-3)
      except Exception as e:
        record(suite="check", case=name, split=split, error=repr(e)[:1500])
        traceback.print_exc()


def box_checks(dtype):
  """Box copies (`MosaicGPUConfig.box_copies`, the default on the GPU) where the checks
  above do not reach them: head_dim 64 (one 64-column part) and 96 (padded to 128), GQA,
  3-D NA at its default 4x4x8 tiles, 64-key KV tiles; forward and gradients vs the float32
  XLA backend, each beside the row copies."""
  tol = 2e-2
  for name, spatial, kern, stride, h, hkv, d in [
      ("na2d 64x64 k13 D=64 GQA 8/2", (64, 64), (13, 13), 1, 8, 2, 64),
      ("na3d 8x32x32 k(4,8,8) D=96", (8, 32, 32), (4, 8, 8), 1, 4, 4, 96),
      ("na3d 8x32x32 k(4,8,8) s(2,4,4) (64-key tiles)", (8, 32, 32), (4, 8, 8), (2, 4, 4),
       4, 4, 128),
      # Ragged grids: boxes that run past the spatial edge (TMA zero fill / clipped stores).
      ("na2d 100x96 k(33,17) ragged rows", (100, 96), (33, 17), 1, 4, 4, 128),
      ("na3d 9x22x24 k(4,7,7) ragged T and H", (9, 22, 24), (4, 7, 7), 1, 4, 2, 128),
  ]:
    q, k, v, do = inputs((1,) + spatial + (h, d), (1,) + spatial + (hkv, d), dtype)
    ref = lambda q, k, v, kern=kern, stride=stride: jsa.na(q, k, v, kern, stride,
                                                           backend="xla")
    for box in (None, False):
      ours = lambda q, k, v, kern=kern, stride=stride, box=box: jsa.na(
          q, k, v, kern, stride, backend="mosaic_gpu", config=MosaicGPUConfig(box_copies=box))
      try:
        check_case(f"mosaic_gpu {name} box_copies={box}", ours, ref, q, k, v, do, tol)
      except Exception as e:
        record(suite="check", case=name, box_copies=box, error=repr(e)[:800])
        traceback.print_exc()


def window_checks(dtype):
  """Window-anchored KV boxes (`MosaicGPUConfig.kv_windows`) at real sizes: forward and
  gradients vs the float32 XLA backend, by default where they pay (stride k/2, odd kernels)
  and forced elsewhere (boxes moved back from the edges), box copies through the raw view
  with KV tiles whose last dim is 8, 16 and 32."""
  tol = 2e-2
  for name, spatial, kern, stride, causal, h, hkv, d, tiles, force in [
      ("na3d 16x32x32 k8x16x16 s(4,8,8)", (16, 32, 32), (8, 16, 16), (4, 8, 8), False, 8, 8,
       128, None, None),
      ("na2d 128x128 k16 s8", (128, 128), (16, 16), (8, 8), False, 8, 8, 128, None, None),
      ("na2d 96x96 k13 D=64 GQA 8/2 (4,32) boxes", (96, 96), (13, 13), 1, False, 8, 2, 64,
       ((8, 16), (4, 32)), True),
      ("na3d 8x48x48 k(3,9,9) (DiT)", (8, 48, 48), (3, 9, 9), 1, False, 8, 8, 128, None,
       None),
      ("na2d 128x128 k33 forced", (128, 128), (33, 33), 1, False, 8, 8, 128, None, True),
      ("na3d 8x24x24 k(4,7,7) s(2,3,3) causal-t forced", (8, 24, 24), (4, 7, 7), (2, 3, 3),
       (True, False, False), 4, 4, 128, ((2, 8, 8), (2, 4, 16)), True),
  ]:
    q, k, v, do = inputs((1,) + spatial + (h, d), (1,) + spatial + (hkv, d), dtype)
    tile_kw = {} if tiles is None else dict(q_tile_shape=tiles[0], kv_tile_shape=tiles[1])
    ref = lambda q, k, v, kern=kern, stride=stride, causal=causal: jsa.na(
        q, k, v, kern, stride, is_causal=causal, backend="xla")
    ours = lambda q, k, v, kern=kern, stride=stride, causal=causal, kw=tile_kw, f=force: jsa.na(
        q, k, v, kern, stride, is_causal=causal, backend="mosaic_gpu",
        config=MosaicGPUConfig(kv_windows=f), **kw)
    try:
      check_case(f"mosaic_gpu {name} kv_windows={force}", ours, ref, q, k, v, do, tol)
    except Exception as e:
      record(suite="check", case=name, kv_windows=force, error=repr(e)[:800])
      traceback.print_exc()


def window_timings(dtype, iters):
  """Window-anchored KV boxes against grid tiles on the same tiles, the previous defaults
  and Triton (forward; the simulator's bound of each), then the dense baselines."""
  sim = lambda spatial, kern, stride, qt, kt: simulate(spatial, kern, stride, q_tile_shape=qt,
                                                       kv_tile_shape=kt)
  for spatial, kern, stride, b, h, extra in [
      ((16, 64, 64), (8, 16, 16), (4, 8, 8), 1, H, [((4, 4, 8), (2, 4, 8))]),
      ((128, 128), (16, 16), (8, 8), 2, H, [((16, 8), (4, 16))]),
      ((256, 256), (13, 13), 1, 2, H, []),
      ((8, 48, 48), (3, 9, 9), 1, 4, H, []),
      ((128, 128), (33, 33), 1, 2, H, []),
      ((16, 64, 64), (8, 16, 16), 1, 1, H, []),
      ((16, 64, 64), (8, 16, 16), (8, 16, 16), 1, H, []),
      ((128, 128), (16, 16), (16, 16), 2, H, []),
  ]:
    tag = (f"na{len(spatial)}d {'x'.join(map(str, spatial))} k{'x'.join(map(str, kern))} "
           f"s{stride} B={b}")
    q, k, v, do = inputs((b,) + spatial + (h, D), (b,) + spatial + (h, D), dtype)
    mask = masks.neighborhood(spatial, kern, stride)
    qt, kt = mg_cost.auto_tiles(mask, 128, 128)
    r = sim(spatial, kern, stride, qt, kt)
    windows = mg_cost.window_pays(mask, qt, kt)
    perf(tag, lambda q, k, v: jsa.na(q, k, v, kern, stride, backend="mosaic_gpu"), q, k, v,
         do, iters, with_bwd=True, impl="mosaic_gpu", variant="defaults", q_tile=qt,
         kv_tile=kt, kv_windows=windows,
         bound=r.window_speedup_bound if windows else r.block_speedup_bound)
    perf(tag, lambda q, k, v: jsa.na(q, k, v, kern, stride, backend="triton"), q, k, v,
         None, iters, impl="triton", variant="defaults")
    for qt2, kt2 in [(qt, kt)] + extra:
      r2 = sim(spatial, kern, stride, qt2, kt2)
      for force in (True, False):
        if (qt2, kt2) == (qt, kt) and force == windows:
          continue  # the default above
        f = lambda q, k, v, qt2=qt2, kt2=kt2, force=force: jsa.na(
            q, k, v, kern, stride, backend="mosaic_gpu", q_tile_shape=qt2, kv_tile_shape=kt2,
            config=MosaicGPUConfig(kv_windows=force))
        perf(tag, f, q, k, v, None, iters, impl="mosaic_gpu", q_tile=qt2, kv_tile=kt2,
             kv_windows=force,
             bound=r2.window_speedup_bound if force else r2.block_speedup_bound)
    write_results(ARGS.out, header())
  baselines(dtype, iters, extra=[(65536, 2), (18432, 4)])


def bound(spatial, kern, stride, qt, kt, split):
  q = mg_boxes._half_tile(qt)[0] if split else qt
  return simulate(spatial, kern, stride, q_tile_shape=q, kv_tile_shape=kt).block_speedup_bound


def split_timings(dtype, iters):
  """Split vs one list per 128-row tile on the same tiles, beside both backends' defaults
  (each row with the simulator's bound of its granularity), then the dense baselines."""
  for spatial, kern, stride, b, variants in [
      ((128, 128), (33, 33), 1, 2, [((16, 8), (8, 8)), ((8, 16), (4, 16))]),
      ((16, 64, 64), (8, 16, 16), 1, 1, [((4, 4, 8), (2, 4, 8)), ((2, 8, 8), (1, 8, 8))]),
      ((16, 64, 64), (8, 16, 16), (4, 8, 8), 1, [((4, 4, 8), (2, 4, 8)),
                                                  ((1, 16, 8), (2, 4, 8))]),
      ((128, 128), (16, 16), (8, 8), 2, [((16, 8), (4, 16)), ((8, 16), (8, 8))]),
  ]:
    tag = (f"na{len(spatial)}d {'x'.join(map(str, spatial))} k{'x'.join(map(str, kern))} "
           f"s{stride} B={b}")
    q, k, v, _ = inputs((b,) + spatial + (H, D), (b,) + spatial + (H, D), dtype)
    for impl in ("mosaic_gpu", "triton"):
      perf(tag, lambda q, k, v, impl=impl: jsa.na(q, k, v, kern, stride, backend=impl), q, k, v,
           None, iters, impl=impl, variant="defaults")
    for qt, kt in variants:
      for split in (True, False):
        cfg = MosaicGPUConfig(split=split)
        f = lambda q, k, v, cfg=cfg, qt=qt, kt=kt: jsa.na(
            q, k, v, kern, stride, backend="mosaic_gpu", q_tile_shape=qt, kv_tile_shape=kt,
            config=cfg)
        perf(tag, f, q, k, v, None, iters, impl="mosaic_gpu", q_tile=qt, kv_tile=kt,
             split=split, bound=bound(spatial, kern, stride, qt, kt, split))
    write_results(ARGS.out, header())
  baselines(dtype, iters)


def hbm_bandwidth(iters):
  """Device-memory bandwidth: a jitted x + 1 over 1 GiB of bf16 (bytes read + written per
  second), the memory floor's ceiling (`simulate.memory_floor_ms`)."""
  x = jnp.ones((1 << 29,), jnp.bfloat16)
  ms = timeit(jax.jit(lambda x: x + 1), x, iters=iters)
  record(suite="hbm", case="x + 1 over 1 GiB bf16", ms=ms, tbps=2 * x.nbytes / ms / 1e9)
  del x


def rows(dtype, iters):
  """Where short rows lose against the bound: perfectly block-sparse 3-D (stride = kernel,
  every visited block full) on tiles whose KV tile is 16 TMA rows of 8 tokens or 8 rows of
  16, the same block structure in 1-D (block-local 2048: one copy per tile), and dense
  attention with 2048 keys (16 KV blocks per item, no block map), each beside the 3-D NA
  tiles the simulator ranks first and second."""
  b, spatial, kern = 1, (16, 64, 64), (8, 16, 16)
  n = 65536
  q, k, v, _ = inputs((b,) + spatial + (H, D), (b,) + spatial + (H, D), dtype)
  for stride, tiles in [(kern, [((4, 4, 8), (4, 4, 8)), ((2, 4, 16), (2, 4, 16)),
                                ((8, 1, 16), (8, 1, 16)), ((2, 8, 8), (2, 8, 8))]),
                        (1, [((4, 4, 8), (4, 4, 8)), ((2, 8, 8), (2, 8, 8))]),
                        ((4, 8, 8), [((4, 4, 8), (2, 4, 8))])]:
    tag = f"na3d 16x64x64 k8x16x16 s{stride} B=1"
    for qt, kt in tiles:
      for box in (True, False):
        if box and mg_boxes._box_groups(kt) is None:
          continue
        f = lambda q, k, v, qt=qt, kt=kt, box=box: jsa.na(
            q, k, v, kern, stride, backend="mosaic_gpu", q_tile_shape=qt, kv_tile_shape=kt,
            config=MosaicGPUConfig(box_copies=box))
        perf(tag, f, q, k, v, None, iters, impl="mosaic_gpu", q_tile=qt, kv_tile=kt,
             kv_copies=2 if box else math.prod(kt[:-1]),
             bound=bound(spatial, kern, stride, qt, kt, False))
    write_results(ARGS.out, header())
  b2 = 2
  q2, k2, v2, _ = inputs((b2, 128, 128, H, D), (b2, 128, 128, H, D), dtype)
  for kern2, stride2 in [((33, 33), 1), ((16, 16), (16, 16)), ((16, 16), (8, 8))]:
    tag = f"na2d 128x128 k{'x'.join(map(str, kern2))} s{stride2} B=2"
    for box in (True, False):
      f = lambda q, k, v, box=box, kern2=kern2, stride2=stride2: jsa.na(
          q, k, v, kern2, stride2, backend="mosaic_gpu", config=MosaicGPUConfig(box_copies=box))
      perf(tag, f, q2, k2, v2, None, iters, impl="mosaic_gpu (auto tiles)", box_copies=box)
  del q2, k2, v2
  write_results(ARGS.out, header())
  flat = lambda x: x.reshape(b, n, H, D)
  q1, k1, v1 = flat(q), flat(k), flat(v)
  perf("block-local 2048, S=65536 B=1", lambda q, k, v: jsa.attention(
      q, k, v, masks.block_local(2048), backend="mosaic_gpu"), q1, k1, v1, None, iters,
       impl="mosaic_gpu", bound=32.0)
  for impl in ("mosaic_gpu", "triton"):
    perf("dense 65536 queries x 2048 keys B=1",
         lambda q, k, v, impl=impl: jsa.attention(q, k[:, :2048], v[:, :2048], backend=impl),
         q1, k1, v1, None, iters, impl=impl, bound=32.0)
  write_results(ARGS.out, header())
  del q, k, v, q1, k1, v1
  hbm_bandwidth(iters)
  baselines(dtype, iters)


def main():
  global ARGS
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=None)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--skip-checks", action="store_true")
  parser.add_argument("--skip-dense", action="store_true")
  parser.add_argument("--only-dense", action="store_true")
  parser.add_argument("--baselines", action="store_true", help="only the dense baselines")
  parser.add_argument("--split", action="store_true",
                      help="per-warpgroup KV lists vs one list per tile (then the baselines)")
  parser.add_argument("--only-mgpu", action="store_true",
                      help="timings of the mosaic_gpu defaults only (no Triton, no schedules)")
  parser.add_argument("--box-checks", action="store_true",
                      help="only the real-size checks of box copies")
  parser.add_argument("--rows", action="store_true",
                      help="short rows and TMA rows against the bound (then the baselines)")
  parser.add_argument("--windows", action="store_true",
                      help="window-anchored KV boxes: box checks, window checks, window vs "
                      "grid timings, the dense baselines")
  ARGS = parser.parse_args()
  # Modes that run the box checks and their own checks, then their timings.
  for on, own_checks, own_timings in ((ARGS.windows, window_checks, window_timings),
                                      (ARGS.split, split_checks, split_timings)):
    if on:
      if not ARGS.skip_checks:
        box_checks(jnp.bfloat16)
        own_checks(jnp.bfloat16)
        write_results(ARGS.out, header())
      return own_timings(jnp.bfloat16, ARGS.iters)
  if ARGS.box_checks:
    box_checks(jnp.bfloat16)
    return write_results(ARGS.out, header())
  if ARGS.rows:
    return rows(jnp.bfloat16, ARGS.iters)
  if ARGS.baselines:
    return baselines(jnp.bfloat16, ARGS.iters)
  if not ARGS.skip_checks:
    checks(jnp.bfloat16)
    write_results(ARGS.out, header())
  timings(jnp.bfloat16, ARGS.iters)
  write_results(ARGS.out, header())


if __name__ == "__main__":
  main()
