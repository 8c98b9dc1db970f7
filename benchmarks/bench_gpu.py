"""GPU correctness-at-scale and timing of the Triton kernels beside cuDNN and jax's Pallas `mha`.

    python -m benchmarks.bench_gpu --suite check     # correctness at real sizes
    python -m benchmarks.bench_gpu --suite perf      # timings vs peers (PERF.md shapes)
    python -m benchmarks.bench_gpu --suite sweep     # TritonConfig sweep on dense S=16k
    python -m benchmarks.bench_gpu --suite na        # NA: mask construction, order, tiles
    python -m benchmarks.bench_gpu --suite all --out results.json

Prints a table and writes JSON (device, date, every figure). Timings: jitted, warm-up, then
the median over 5 repeats of the mean of --iters back-to-back calls (one block_until_ready
per repeat).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu import TritonConfig

RESULTS: list[dict] = []


def timeit(fn, *args, iters=20, warmup=3, repeats=5):
  return time_ms(fn, *args, iters=iters, repeats=repeats, warmup=warmup)


def rel(a, b):
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def rel_errors(got, want, names=("out", "dq", "dk", "dv"), digits=None):
  """`rel` per array of the matching tuples `got` and `want` (the output and the gradients
  unless `names` says otherwise), keyed by name; rounded to `digits` places where given."""
  errs = {n: rel(g, w) for n, g, w in zip(names, got, want, strict=True)}
  return errs if digits is None else {n: round(e, digits) for n, e in errs.items()}


def all_finite(arrays) -> bool:
  """Whether every element of every array is finite (no NaN, no inf)."""
  return all(bool(jnp.isfinite(jnp.asarray(a, jnp.float32)).all()) for a in arrays)


def inputs(shape_q, shape_kv, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], shape_q, dtype)
  k = jax.random.normal(ks[1], shape_kv, dtype)
  v = jax.random.normal(ks[2], shape_kv, dtype)
  do = jax.random.normal(ks[3], shape_q, dtype)
  return q, k, v, do


def documents(b, s, n=4, seed=0):
  """Segment ids [b, s] int32 (host NumPy: a constant under jit) of `n` packed documents of
  random lengths per batch row."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(1, s, (b, n - 1)), axis=1)
  return (np.arange(s)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


def document_pairs(seg) -> np.ndarray:
  """Causal (query, key) pairs inside the documents of each batch row of `seg` [b, s]."""
  return np.array([sum(int(m) * (int(m) + 1) // 2 for m in np.bincount(row))
                   for row in np.asarray(seg)])


def fwd_bwd(fn):
  """Jitted f(*inputs, do) -> (out, gradient of every input) via vjp: (out, dq, dk, dv) for
  fn(q, k, v)."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args[:-1])
    return (out,) + vjp(args[-1])
  return jax.jit(run)


def perf_row(section, case, impl, fn, args, do, iters, **extra):
  """Record the forward and forward+backward time of fn(*args) (cotangent `do`; None:
  forward only), or the error."""
  try:
    t_f = timeit(jax.jit(fn), *args, iters=iters)
    t_b = timeit(fwd_bwd(fn), *args, do, iters=iters) if do is not None else None
    record(section=section, case=case, impl=impl, fwd_ms=t_f, fwd_bwd_ms=t_b, **extra)
  except Exception as e:
    record(section=section, case=case, impl=impl, error=repr(e)[:600])
    traceback.print_exc()


def record(**kw):
  kw = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()}
  RESULTS.append(kw)
  print(json.dumps(kw), flush=True)
  return kw


def header(dtype: str = "bfloat16") -> dict:
  """What every results file starts with: device, jax version, date, dtype."""
  dev = jax.devices()[0]
  return dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
              date=datetime.date.today().isoformat(), dtype=dtype)


def write_results(path, head: dict):
  """The recorded results under `head` (see `header`) as JSON at `path` (None: nothing)."""
  if path:
    with open(path, "w") as f:
      json.dump(dict(head, results=RESULTS), f, indent=1)


# --------------------------------------------------------------------------------------------


def check_case(name, ours, ref, q, k, v, do, tol):
  got = fwd_bwd(ours)(q, k, v, do)
  want = fwd_bwd(ref)(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                      do.astype(jnp.float32))
  errs = [rel(a, b) for a, b in zip(got, want)]
  nan = any(bool(jnp.any(jnp.isnan(x))) for x in got)
  record(suite="check", case=name, err_out=errs[0], err_dq=errs[1], err_dk=errs[2],
         err_dv=errs[3], nan=nan, ok=(not nan) and all(e < tol for e in errs))


def suite_check(dtype):
  tol = 2e-2
  # Dense and causal at 4k (reference: cuDNN-free f32 XLA dense attention).
  for name, mask, h, hkv, d, s in [
      ("dense S=4096 D=128", None, 16, 16, 128, 4096),
      ("causal S=4096 D=128", masks.causal(), 16, 16, 128, 4096),
      ("causal GQA 16/4 S=4096 D=64", masks.causal(), 16, 4, 64, 4096),
      ("window 512 S=8191 D=96 (odd, padded D)", masks.sliding_window(511), 8, 8, 96, 8191),
      ("segments+causal S=4096", "seg", 8, 8, 128, 4096),
  ]:
    q, k, v, do = inputs((2, s, h, d), (2, s, hkv, d), dtype)
    seg = None
    if mask == "seg":
      seg = jnp.asarray(np.repeat(np.arange(4), s // 4)[None].repeat(2, 0), jnp.int32)
      mask = masks.causal()
    ours = lambda q, k, v, m=mask, seg=seg: jsa.attention(q, k, v, m, segment_ids=seg,
                                                          backend="triton")
    ref = lambda q, k, v, m=mask, seg=seg: jsa.attention(q, k, v, m, segment_ids=seg,
                                                         backend="xla", block_q=128, block_kv=128)
    try:
      check_case(name, ours, ref, q, k, v, do, tol)
    except Exception as e:  # keep going: one failure must not hide the others
      record(suite="check", case=name, error=repr(e)[:500])
      traceback.print_exc()
  for name, spatial, kern, stride, dil, causal in [
      ("na2d 64x64 k13", (64, 64), 13, 1, 1, False),
      ("na2d 48x40 k(7,9) s(2,3) d(2,1)", (48, 40), (7, 9), (2, 3), (2, 1), False),
      ("na3d 8x24x24 k(4,7,7) causal-t", (8, 24, 24), (4, 7, 7), 1, 1, (True, False, False)),
      ("na2d 100x90 k(33,17) odd (padded tiles)", (100, 90), (33, 17), 1, 1, False),
  ]:
    q, k, v, do = inputs((1,) + spatial + (8, 128), (1,) + spatial + (8, 128), dtype)
    ref = lambda q, k, v, a=(kern, stride, dil, causal): jsa.na(q, k, v, *a, backend="xla")
    for variant, cfg in (("", None), (" element masks", TritonConfig(mask_mma=False))):
      ours = lambda q, k, v, a=(kern, stride, dil, causal), cfg=cfg: jsa.na(
          q, k, v, *a, backend="triton", config=cfg)
      try:
        check_case(name + variant, ours, ref, q, k, v, do, tol)
      except Exception as e:
        record(suite="check", case=name + variant, error=repr(e)[:500])
        traceback.print_exc()


# --------------------------------------------------------------------------------------------


def _perf(name, fn, q, k, v, do, flops_fwd, iters, **extra):
  fwd = jax.jit(fn)
  both = fwd_bwd(fn)
  try:
    t_f = timeit(fwd, q, k, v, iters=iters)
    t_b = timeit(both, q, k, v, do, iters=iters)
    record(suite="perf", case=name, fwd_ms=t_f, fwd_bwd_ms=t_b,
           fwd_tflops=flops_fwd / t_f / 1e9, fwd_bwd_tflops=3.5 * flops_fwd / t_b / 1e9, **extra)
  except Exception as e:
    record(suite="perf", case=name, error=repr(e)[:500], **extra)
    traceback.print_exc()


def suite_perf(dtype, iters, only=None):
  b, h, d = 2, 16, 128
  cudnn = lambda causal, window=None: (lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="cudnn", local_window_size=window))

  def want(tag):
    return only is None or tag in only

  if want("dense"):
    for s in (4096, 16384):
      q, k, v, do = inputs((b, s, h, d), (b, s, h, d), dtype)
      flops = 4 * b * h * s * s * d
      _perf(f"dense S={s}", lambda q, k, v: jsa.attention(q, k, v, backend="triton"),
            q, k, v, do, flops, iters, impl="ours-triton")
      _perf(f"dense S={s}", cudnn(False), q, k, v, do, flops, iters, impl="cudnn")
      _perf(f"causal S={s}", lambda q, k, v: jsa.attention(q, k, v, masks.causal(),
                                                           backend="triton"),
            q, k, v, do, flops / 2, iters, impl="ours-triton")
      _perf(f"causal S={s}", cudnn(True), q, k, v, do, flops / 2, iters, impl="cudnn")
  if want("window"):
    s, w = 32768, 2048
    q, k, v, do = inputs((1, s, h, d), (1, s, h, d), dtype)
    useful = 4 * h * d * sum(min(i + 1, w) for i in range(s))
    _perf("sliding window 2048 S=32768 B=1",
          lambda q, k, v: jsa.attention(q, k, v, masks.sliding_window(w - 1), backend="triton"),
          q, k, v, do, useful, iters, impl="ours-triton")
    _perf("sliding window 2048 S=32768 B=1", cudnn(True, (w - 1, 0)), q, k, v, do, useful, iters,
          impl="cudnn")
    _perf("causal S=32768 B=1", lambda q, k, v: jsa.attention(q, k, v, masks.causal(),
                                                              backend="triton"),
          q, k, v, do, 2 * h * d * s * s, iters, impl="ours-triton")
  if want("na2d"):
    _perf_na(h, d, dtype, iters, (128, 128), (33, 33), 2, permute_probe=True, cudnn_dense=True)
  if want("strided"):
    # Strided GNA: stride = kernel (blocked) and stride = kernel / 2, tiles aligned with the
    # stride groups: perfectly block-sparse, so the bound is the ideal FLOP ratio.
    for spatial, kern, stride, b, bq, bk in [
        ((128, 128), (16, 16), (16, 16), 2, 128, 64),
        ((128, 128), (16, 16), (8, 8), 2, 128, 64),
        ((128, 128), (16, 16), (8, 8), 2, 64, 64),
        ((16, 64, 64), (8, 16, 16), (8, 16, 16), 1, 128, 64),
        ((16, 64, 64), (8, 16, 16), (4, 8, 8), 1, 128, 64)]:
      q, k, v, do = inputs((b,) + spatial + (h, d), (b,) + spatial + (h, d), dtype)
      sim = jsa.simulate(spatial, kern, stride, block_q=bq, block_kv=bk)
      useful = 4 * b * h * d * sim.attended_pairs
      name = (f"na{len(spatial)}d {'x'.join(map(str, spatial))} k{kern} s{stride} B={b} "
              f"blocks {bq}x{bk}")
      _perf(name, lambda q, k, v, a=(kern, stride), bq=bq, bk=bk: jsa.na(
                q, k, v, *a, backend="triton", block_q=bq, block_kv=bk),
            q, k, v, do, useful, iters, impl="ours-triton", bound=sim.block_speedup_bound,
            ideal=sim.ideal_speedup, partial=sim.partial_blocks,
            tiles=str(sim.q_tile_shape) + "/" + str(sim.kv_tile_shape))
  if want("na3d"):
    _perf_na(h, d, dtype, iters, (16, 64, 64), (8, 16, 16), 1)


def _perf_na(h, d, dtype, iters, spatial, kern, b, permute_probe=False, cudnn_dense=False):
  """NA end to end, in tiled order (no permutation), and our dense kernel on the same tokens."""
  tag = f"na{len(spatial)}d {'x'.join(map(str, spatial))}"
  q, k, v, do = inputs((b,) + spatial + (h, d), (b,) + spatial + (h, d), dtype)
  n = math.prod(spatial)
  sim = jsa.simulate(spatial, kern, block_q=128, block_kv=64, block_q_options=(64,))
  useful = 4 * b * h * d * sim.attended_pairs
  _perf(f"{tag} k{'x'.join(map(str, kern))} B={b}",
        lambda q, k, v: jsa.na(q, k, v, kern, backend="triton"),
        q, k, v, do, useful, iters, impl="ours-triton", bound=sim.block_speedup_bound,
        tiles=str(sim.q_tile_shape) + "/" + str(sim.kv_tile_shape))
  t = jsa.na_tiling(spatial, kern, block=128)
  tq, tk, tv, tdo = (t.tile(x) for x in (q, k, v, do))
  sim128 = jsa.simulate(spatial, kern, q_tile_shape=t.layout.tile_shape,
                        kv_tile_shape=t.layout.tile_shape)
  _perf(f"{tag} k{'x'.join(map(str, kern))} B={b} tiled order (no permutation)",
        lambda q, k, v: jsa.na(q, k, v, kern, backend="triton", tiling=t), tq, tk, tv, tdo,
        useful, iters, impl="ours-triton", bound=sim128.block_speedup_bound,
        tiles=str(t.layout.tile_shape))
  if permute_probe:
    from jax_sparse_attn.layout import TiledLayout
    ones = (1,) * len(spatial)
    lq = TiledLayout(spatial, ones, sim.q_tile_shape)
    lk = TiledLayout(spatial, ones, sim.kv_tile_shape)
    permute = jax.jit(lambda q, k, v: (lq.from_kernel(lq.to_kernel(q) + 1), lk.to_kernel(k),
                                       lk.to_kernel(v)))
    record(suite="perf", case=f"{tag} token permutation only (q,k,v in + o out)",
           fwd_ms=timeit(permute, q, k, v, iters=iters), impl="xla")
  flat = lambda x: x.reshape(b, n, h, d)
  dense_flops = 4 * b * h * d * n * n
  _perf(f"{tag} dense baseline", lambda q, k, v: jsa.attention(
      flat(q), flat(k), flat(v), backend="triton").reshape(q.shape), q, k, v, do,
      dense_flops, iters, impl="ours-triton")
  if cudnn_dense:
    _perf(f"{tag} dense baseline", lambda q, k, v: jax.nn.dot_product_attention(
        flat(q), flat(k), flat(v), implementation="cudnn").reshape(q.shape), q, k, v, do,
        dense_flops, iters, impl="cudnn")


def suite_na(dtype, iters):
  """Neighborhood-attention variants: mask construction (MMA bias vs element test), token
  order (gathered rows vs tiled order), and tile shapes (forward only)."""
  h, d = 16, 128
  for spatial, kern, b, tiles in [
      ((128, 128), (33, 33), 2, [((8, 16), (8, 8)), ((16, 8), (8, 8)), ((8, 8), (8, 8))]),
      ((16, 64, 64), (8, 16, 16), 1, [((2, 8, 8), (1, 8, 8)), ((4, 4, 8), (4, 4, 4)),
                                      ((2, 4, 8), (4, 4, 4)), ((2, 4, 8), (2, 4, 8))])]:
    tag = f"na{len(spatial)}d {'x'.join(map(str, spatial))} k{'x'.join(map(str, kern))} B={b}"
    q, k, v, do = inputs((b,) + spatial + (h, d), (b,) + spatial + (h, d), dtype)
    sim = jsa.simulate(spatial, kern, block_q=128, block_kv=64, block_q_options=(64,))
    useful = 4 * b * h * d * sim.attended_pairs
    for name, cfg in (("mma", TritonConfig()),
                      ("mma computed tests", TritonConfig(mask_tables=False)),
                      ("element", TritonConfig(mask_mma=False)),
                      ("mma two loops", TritonConfig(single_loop=False))):
      _perf(tag, lambda q, k, v, cfg=cfg: jsa.na(q, k, v, kern, backend="triton", config=cfg),
            q, k, v, do, useful, iters, impl="ours-triton", variant=name,
            bound=sim.block_speedup_bound, tiles=f"{sim.q_tile_shape}/{sim.kv_tile_shape}")
    t = jsa.na_tiling(spatial, kern, block=128)
    tq, tk, tv, tdo = (t.tile(x) for x in (q, k, v, do))
    for name, cfg in (("mma", TritonConfig()),):
      _perf(tag + " tiled order", lambda q, k, v, cfg=cfg: jsa.na(
          q, k, v, kern, backend="triton", tiling=t, config=cfg), tq, tk, tv, tdo, useful, iters,
          impl="ours-triton", variant=name, tiles=str(t.layout.tile_shape))
    for qt, kt in tiles:
      bq, bk = math.prod(qt), math.prod(kt)
      st = jsa.simulate(spatial, kern, block_q=bq, block_kv=bk, q_tile_shape=qt,
                        kv_tile_shape=kt)
      fn = jax.jit(lambda q, k, v, qt=qt, kt=kt, bq=bq, bk=bk: jsa.na(
          q, k, v, kern, backend="triton", q_tile_shape=qt, kv_tile_shape=kt, block_q=bq,
          block_kv=bk))
      try:
        t_f = timeit(fn, q, k, v, iters=iters)
        fn_c = jax.jit(lambda q, k, v, qt=qt, kt=kt, bq=bq, bk=bk: jsa.na(
            q, k, v, kern, backend="triton", q_tile_shape=qt, kv_tile_shape=kt, block_q=bq,
            block_kv=bk, config=TritonConfig(mask_tables=False)))
        record(suite="na", case=tag + " fwd", tiles=f"{qt}/{kt}", variant="mma computed tests",
               fwd_ms=timeit(fn_c, q, k, v, iters=iters))
        record(suite="na", case=tag + " fwd", tiles=f"{qt}/{kt}", fwd_ms=t_f,
               fwd_tflops=useful / t_f / 1e9, bound=st.block_speedup_bound,
               full=st.full_blocks, partial=st.partial_blocks)
      except Exception as e:
        record(suite="na", case=tag + " fwd", tiles=f"{qt}/{kt}", error=repr(e)[:300])


def suite_loops(dtype, iters):
  """Loop structure variants on the sparse workloads (TritonConfig flags)."""
  h, d = 16, 128
  variants = {"default": TritonConfig(), "single_loop": TritonConfig(single_loop=True),
              "unsigned_intervals": TritonConfig(unsigned_intervals=True)}
  for name, cfg in variants.items():
    for spatial, kern, b in (((128, 128), (33, 33), 2), ((16, 64, 64), (8, 16, 16), 1)):
      q, k, v, do = inputs((b,) + spatial + (h, d), (b,) + spatial + (h, d), dtype)
      t = jsa.na_tiling(spatial, kern, block=128)
      tq, tk, tv = (t.tile(x) for x in (q, k, v))
      fn = jax.jit(lambda q, k, v, cfg=cfg, t=t, kern=kern: jsa.na(
          q, k, v, kern, backend="triton", tiling=t, config=cfg))
      record(suite="loops", case=f"na{len(spatial)}d tiled fwd", variant=name,
             fwd_ms=timeit(fn, tq, tk, tv, iters=iters))
    s = 32768
    q, k, v, do = inputs((1, s, h, d), (1, s, h, d), dtype)
    fn = jax.jit(lambda q, k, v, cfg=cfg: jsa.attention(q, k, v, masks.sliding_window(2047),
                                                        backend="triton", config=cfg))
    record(suite="loops", case="window 2048 S=32768 fwd", variant=name,
           fwd_ms=timeit(fn, q, k, v, iters=iters))


def suite_sweep_d(dtype, iters, d):
  """Tile/warp/stage sweep for another head_dim (dense S=16384, B=2, H=16)."""
  b, h, s = 2, 16, 16384
  q, k, v, do = inputs((b, s, h, d), (b, s, h, d), dtype)
  flops = 4 * b * h * s * s * d
  for map_q, map_kv, tq, tk, warps, stages in [
      (128, 64, 128, 64, 4, 2), (128, 64, 128, 64, 4, 3), (128, 128, 128, 128, 4, 2),
      (128, 128, 128, 128, 8, 2), (64, 64, 64, 64, 4, 2)]:
    cfg = TritonConfig(block_q=tq, block_kv=tk, num_warps=warps, num_stages=stages)
    fn = lambda q, k, v, cfg=cfg, mq=map_q, mk=map_kv: jsa.attention(
        q, k, v, backend="triton", block_q=mq, block_kv=mk, config=cfg)
    try:
      t = timeit(jax.jit(fn), q, k, v, iters=iters)
      record(suite="sweep", case=f"dense S=16384 D={d} fwd", map=f"{map_q}x{map_kv}",
             tile=f"{tq}x{tk}", warps=warps, stages=stages, fwd_ms=t, fwd_tflops=flops / t / 1e9)
    except Exception as e:
      record(suite="sweep", case=f"dense D={d} fwd", tile=f"{tq}x{tk}", error=repr(e)[:300])
  for tq, tk, warps, stages in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2),
                                (64, 128, 4, 2)]:
    cfg = TritonConfig(bwd_block_q=tq, bwd_block_kv=tk, bwd_num_warps=warps,
                       bwd_num_stages=stages, dq_block_q=tq, dq_block_kv=tk, dq_num_warps=warps,
                       dq_num_stages=stages)
    mk = max(64, tk)
    fn = lambda q, k, v, cfg=cfg, mk=mk: jsa.attention(q, k, v, backend="triton", block_q=128,
                                                       block_kv=mk, config=cfg)
    try:
      t = timeit(fwd_bwd(fn), q, k, v, do, iters=max(iters // 2, 5))
      record(suite="sweep", case=f"dense S=16384 D={d} fwd+bwd", tile=f"{tq}x{tk}", warps=warps,
             stages=stages, fwd_bwd_ms=t, fwd_bwd_tflops=3.5 * flops / t / 1e9)
    except Exception as e:
      record(suite="sweep", case=f"dense D={d} fwd+bwd", tile=f"{tq}x{tk}", error=repr(e)[:300])


def suite_sweep(dtype, iters):
  b, h, d, s = 2, 16, 128, 16384
  q, k, v, do = inputs((b, s, h, d), (b, s, h, d), dtype)
  flops = 4 * b * h * s * s * d
  for map_q, map_kv, tq, tk, warps, stages in [
      (128, 64, 128, 64, 4, 2), (128, 128, 128, 64, 4, 2), (128, 128, 128, 128, 8, 2),
  ]:
    cfg = TritonConfig(block_q=tq, block_kv=tk, num_warps=warps, num_stages=stages)
    fn = lambda q, k, v, cfg=cfg: jsa.attention(q, k, v, backend="triton", block_q=map_q,
                                                block_kv=map_kv, config=cfg)
    try:
      t = timeit(jax.jit(fn), q, k, v, iters=iters)
      record(suite="sweep", case="dense S=16384 fwd", map=f"{map_q}x{map_kv}",
             tile=f"{tq}x{tk}", warps=warps, stages=stages, fwd_ms=t,
             fwd_tflops=flops / t / 1e9)
    except Exception as e:
      record(suite="sweep", case="dense fwd", tile=f"{tq}x{tk}", error=repr(e)[:300])
  # Backward kernels separately: vary one kernel's config, keep the other fixed; the
  # difference between configs is that kernel's difference.
  for kind, tq, tk, warps, stages in [
      ("base", 64, 64, 4, 2),
      ("dq", 128, 64, 4, 2), ("dq", 128, 64, 8, 2), ("dq", 64, 128, 4, 2), ("dq", 128, 32, 4, 2),
      ("dq", 64, 64, 4, 3),
      ("dkv", 64, 128, 4, 2), ("dkv", 64, 128, 8, 2), ("dkv", 128, 128, 8, 2), ("dkv", 32, 128, 4, 2),
      ("dkv", 64, 64, 4, 3), ("dkv", 32, 64, 4, 3),
  ]:
    if kind == "dq":
      cfg = TritonConfig(dq_block_q=tq, dq_block_kv=tk, dq_num_warps=warps, dq_num_stages=stages)
    elif kind == "dkv":
      cfg = TritonConfig(bwd_block_q=tq, bwd_block_kv=tk, bwd_num_warps=warps,
                         bwd_num_stages=stages)
    else:
      cfg = TritonConfig()
    mq, mk = max(128, tq), max(128 if kind == "dkv" and tk == 128 else 64, tk)
    fn = lambda q, k, v, cfg=cfg, mq=mq, mk=mk: jsa.attention(
        q, k, v, backend="triton", block_q=mq, block_kv=mk, config=cfg)
    try:
      t = timeit(fwd_bwd(fn), q, k, v, do, iters=max(iters // 2, 5))
      record(suite="sweep", case="dense S=16384 fwd+bwd", kernel=kind, map=f"{mq}x{mk}",
             tile=f"{tq}x{tk}", warps=warps, stages=stages, fwd_bwd_ms=t,
             fwd_bwd_tflops=3.5 * flops / t / 1e9)
    except Exception as e:
      record(suite="sweep", case="dense fwd+bwd", kernel=kind, tile=f"{tq}x{tk}",
             error=repr(e)[:300])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", default="all", help="check | perf | na | sweep | sweep64 | loops | all (comma list)")
  parser.add_argument("--only", default=None, help="perf cases: dense,window,na2d,strided,na3d")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  suites = args.suite.split(",")
  head = header(args.dtype)
  print(json.dumps(head), flush=True)
  if "check" in suites or "all" in suites:
    suite_check(dtype)
  if "perf" in suites or "all" in suites:
    suite_perf(dtype, args.iters, args.only.split(",") if args.only else None)
  if "sweep64" in suites:
    suite_sweep_d(dtype, args.iters, 64)
  if "loops" in suites:
    suite_loops(dtype, args.iters)
  if "na" in suites:
    suite_na(dtype, args.iters)
  if "sweep" in suites or "all" in suites:
    suite_sweep(dtype, args.iters)
  write_results(args.out, head)


if __name__ == "__main__":
  main()
