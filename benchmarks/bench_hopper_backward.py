"""The Hopper backward (`backend="mosaic_gpu"`): gradient checks at real sizes and timings
beside the Triton backward on the same forward and cuDNN, in one run.

    python -m benchmarks.bench_hopper_backward --sections check,perf --out results.json

check: gradients of the Mosaic GPU forward + backward against the float32 XLA backend
(relative L2 error per gradient; the Mosaic GPU backward on every case). perf: forward and
forward+backward per workload for `MosaicGPUConfig()` (the default choice), `backward=`
"mosaic_gpu" and "triton" (`--impls`), and cuDNN through
`jax.nn.dot_product_attention` where it has the mask. TFLOP/s by ../shared/PERF.md's
conventions (fwd+bwd = 3.5 x the forward FLOPs; sparse rows count the attended pairs).
"""
from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks
from pallas_kernels.gpu import MosaicGPUConfig

from .bench_gpu import (all_finite, document_pairs, documents, fwd_bwd, header, inputs, record,
                        rel_errors, timeit, write_results)

LM_MASK = masks.causal() & (masks.sliding_window(511) | masks.sink(4))


def _blocks(mask, s):
  from jax_sparse_attn.layout import SequenceLayout
  from jax_sparse_attn.plan import make_plan
  return make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128)).block_map.num_visited


OURS = {"mosaic": MosaicGPUConfig(),  # the default: backward by `policy.picks_mosaic`
        "mosaic-bwd": MosaicGPUConfig(backward="mosaic_gpu"),
        "mosaic-own-dq": MosaicGPUConfig(backward="mosaic_gpu", backward_dq="own"),
        "mosaic-split-dq": MosaicGPUConfig(backward="mosaic_gpu", backward_dq="split"),
        "mosaic-dq-kernel": MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel"),
        "mosaic-pingpong": MosaicGPUConfig(backward="mosaic_gpu", backward_pingpong=True),
        "triton-bwd": MosaicGPUConfig(backward="triton")}
IMPLS = ["mosaic", "triton-bwd"]
PEERS = ["cudnn", "dense"]
# Segment ids: the runtime map built from them ("on", `ops.SEGMENT_BLOCK_MAPS`) and/or the
# static map with the test on every block ("off").
SEGMENT_MAPS = ["on"]


def _with_segment_maps(fn, mode):
  """`fn` traced with `ops.SEGMENT_BLOCK_MAPS` set for `mode` ("on"/"off")."""
  from jax_sparse_attn import ops

  def run(*args):
    saved = ops.SEGMENT_BLOCK_MAPS
    ops.SEGMENT_BLOCK_MAPS = mode == "on"
    try:
      return fn(*args)
    finally:
      ops.SEGMENT_BLOCK_MAPS = saved
  return run


def _grads_rel(fn, ref_fn, q, k, v, do):
  got = fwd_bwd(fn)(q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  want = fwd_bwd(ref_fn)(f32(q), f32(k), f32(v), f32(do))
  errs = rel_errors(got, want)
  finite = all_finite(got)
  return errs, finite


def section_check(dtype, impl="mosaic-bwd", with_na=True):
  """Gradients of `impl` (an OURS config) against the float32 XLA backend."""
  b = 1
  cases = [
      ("dense S=4096 D128", (4096, 4, 4, 128), None),
      ("causal S=4096 GQA 8/2 D128", (4096, 8, 2, 128), masks.causal()),
      ("causal S=3001 D96", (3001, 4, 4, 96), masks.causal()),
      ("window 512 S=8192 D64", (8192, 4, 4, 64), masks.sliding_window(511)),
      ("causal window 1024 | sink 4 S=6000 D128", (6000, 4, 4, 128),
       masks.causal() & (masks.sliding_window(1023) | masks.sink(4))),
      ("LM mask + 4 documents S=8192 GQA 8/2 D128", (8192, 8, 2, 128), LM_MASK),
      ("causal + 4 documents S=8192 GQA 8/2 D128", (8192, 8, 2, 128), masks.causal()),
      ("from_function S=4096 D64", (4096, 4, 4, 64),
       masks.from_function(lambda q, k: (q >= k) & ((q - k) % 5 != 3))),
  ]
  for name, (s, h, hkv, d), mask in cases:
    q, k, v, do = inputs((b, s, h, d), (b, s, hkv, d), dtype)
    seg = documents(b, s) if "documents" in name else None
    try:
      errs, finite = _grads_rel(
          lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg, backend="mosaic_gpu",
                                        config=OURS[impl]),
          lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg, backend="xla"),
          q, k, v, do)
      record(section="check", case=name, impl=impl, finite=finite, **errs)
    except Exception as e:
      record(section="check", case=name, error=repr(e)[:500])
      traceback.print_exc()
  if not with_na:
    return
  na_cases = [
      ("na2d 64x64 k17", (64, 64), (17, 17), 1, 1, False),
      ("na2d 48x64 k9 dil2 causal-y", (48, 64), (9, 9), 1, 2, (True, False)),
      ("na2d 64x64 k16 s8", (64, 64), (16, 16), 8, 1, False),
      ("na3d 8x32x32 k4x8x8", (8, 32, 32), (4, 8, 8), 1, 1, False),
      ("na3d 8x32x32 k4x8x8 s2x4x4", (8, 32, 32), (4, 8, 8), (2, 4, 4), 1, False),
  ]
  for name, spatial, kern, stride, dil, causal in na_cases:
    shape = (b, *spatial, 4, 128)
    q, k, v, do = inputs(shape, shape, dtype)
    try:
      errs, finite = _grads_rel(
          lambda q, k, v: jsa.na(q, k, v, kern, stride, dil, causal, backend="mosaic_gpu",
                                 config=OURS[impl]),
          lambda q, k, v: jsa.na(q, k, v, kern, stride, dil, causal, backend="xla"),
          q, k, v, do)
      record(section="check", case=name, finite=finite, **errs)
    except Exception as e:
      record(section="check", case=name, error=repr(e)[:500])
      traceback.print_exc()


def _perf(name, impl, fn, q, k, v, do, flops_fwd, iters, **extra):
  try:
    t_f = timeit(jax.jit(fn), q, k, v, iters=iters)
    t_b = timeit(fwd_bwd(fn), q, k, v, do, iters=iters)
    record(section="perf", case=name, impl=impl, fwd_ms=t_f, fwd_bwd_ms=t_b,
           bwd_ms=t_b - t_f, fwd_tflops=flops_fwd / t_f / 1e9,
           fwd_bwd_tflops=3.5 * flops_fwd / t_b / 1e9, **extra)
  except Exception as e:
    record(section="perf", case=name, impl=impl, error=repr(e)[:500])
    traceback.print_exc()


def _perf_documents(name, mask, seg, q, k, v, do, useful, iters, with_triton=False, **extra):
  """`_perf` of each IMPLS config (and the Triton backend) with segment ids, per
  SEGMENT_MAPS mode ("+static-map": the static map, the segment test on every block)."""
  for mode in SEGMENT_MAPS:
    tag = "" if mode == "on" else "+static-map"
    runs = [(impl, dict(backend="mosaic_gpu", config=OURS[impl])) for impl in IMPLS]
    runs += [("triton", dict(backend="triton"))] if with_triton else []
    for impl, kw in runs:
      fn = lambda q, k, v, kw=kw: jsa.attention(q, k, v, mask, segment_ids=seg, **kw)
      _perf(name, impl + tag, _with_segment_maps(fn, mode), q, k, v, do, useful, iters,
            segment_maps=mode, **extra)


def section_perf(dtype, iters, only, d=128):
  h = 16
  cudnn = lambda causal, window=None: (lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="cudnn", local_window_size=window))
  rows = []
  if "dense" in only:
    s, b = 16384, 2
    rows.append(("dense S=16384", (b, s), None, 4 * b * h * s * s * d, cudnn(False)))
    rows.append(("causal S=16384", (b, s), masks.causal(), 2 * b * h * s * s * d, cudnn(True)))
  if "window" in only:
    s, w = 32768, 2048
    useful = 4 * h * d * sum(min(i + 1, w) for i in range(s))
    rows.append(("causal window 2048 S=32768 B=1", (1, s), masks.sliding_window(w - 1), useful,
                 cudnn(True, (w - 1, 0))))
  for name, (b, s), mask, flops, peer in rows:
    q, k, v, do = inputs((b, s, h, d), (b, s, h, d), dtype)
    for impl in IMPLS:
      cfg = OURS[impl]
      _perf(name, impl, lambda q, k, v, c=cfg: jsa.attention(q, k, v, mask, backend="mosaic_gpu",
                                                             config=c),
            q, k, v, do, flops, iters)
    if "cudnn" in PEERS:
      _perf(name, "cudnn", peer, q, k, v, do, flops, iters)
  if "lm" in only:  # the models/ causal LM's attention at real size
    b, s, h_lm, hkv = 2, 8192, 16, 4
    q, k, v, do = inputs((b, s, h_lm, d), (b, s, hkv, d), dtype)
    seg = documents(b, s)
    i = np.arange(s)
    pairs = int(np.sum(np.minimum(i + 1, 512) + np.clip(i - 511, 0, 4)))  # before documents
    useful = 4 * b * h_lm * d * pairs
    causal_blocks = _blocks(masks.causal(), s)
    bound = causal_blocks / _blocks(LM_MASK, s)
    name = "LM causal & (window 512 | 4 sinks), 4 documents, S=8192 B=2 H=16/4"
    _perf_documents(name, LM_MASK, seg, q, k, v, do, useful, iters, with_triton=True,
                    bound=bound)
    _perf(name + " (our dense causal, no documents)", "mosaic-causal",
          lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu"),
          q, k, v, do, useful, iters)
    if "cudnn" in PEERS:
      _perf(name + " (cuDNN causal window 512, no sinks or documents)", "cudnn",
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn", local_window_size=(511, 0)),
            q, k, v, do, useful, iters)
      _perf(name + " (cuDNN dense causal)", "cudnn",
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn"),
            q, k, v, do, useful, iters)
  if "docs" in only:  # packed documents under a causal mask: the runtime map skips blocks
    b, s = 2, 16384
    q, k, v, do = inputs((b, s, h, d), (b, s, h, d), dtype)
    seg = documents(b, s)
    from jax_sparse_attn import block_map as block_map_lib
    from jax_sparse_attn.layout import SequenceLayout
    from jax_sparse_attn.plan import make_plan
    static = make_plan(masks.causal(), SequenceLayout(s, 128), SequenceLayout(s, 128)).block_map
    cls = np.asarray(block_map_lib.segment_classes(seg, seg, static))
    visited = int((cls > 0).sum())
    bound = b * static.num_visited / visited
    pairs = int(document_pairs(seg).sum())
    useful = 4 * h * d * pairs
    name = "causal, 4 documents, S=16384 B=2"
    _perf_documents(name, masks.causal(), seg, q, k, v, do, useful, iters, bound=bound,
                    visited_blocks=visited, full_blocks=int((cls == 2).sum()))
    _perf(name + " (our causal, no documents)", "mosaic-causal",
          lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend="mosaic_gpu"),
          q, k, v, do, useful, iters)
    if "cudnn" in PEERS:
      _perf(name + " (cuDNN causal, no documents)", "cudnn", cudnn(True), q, k, v, do, useful,
            iters)
  na_rows = []
  if "na2d" in only:
    na_rows.append(("na2d 128x128 k33 B=2", (128, 128), (33, 33), 1, 2))
  if "na3d" in only:
    na_rows.append(("na3d 16x64x64 k8x16x16 B=1", (16, 64, 64), (8, 16, 16), 1, 1))
    na_rows.append(("na3d 16x64x64 k8x16x16 s4x8x8 B=1", (16, 64, 64), (8, 16, 16), (4, 8, 8),
                    1))
  for name, spatial, kern, stride, b in na_rows:
    shape = (b, *spatial, h, d)
    q, k, v, do = inputs(shape, shape, dtype)
    sim = jsa.simulate(spatial, kern, stride, block_q=128, block_kv=128)
    useful = 4 * b * h * d * sim.attended_pairs
    for impl in IMPLS:
      cfg = OURS[impl]
      _perf(name, impl, lambda q, k, v, c=cfg: jsa.na(q, k, v, kern, stride, backend="mosaic_gpu",
                                                      config=c),
            q, k, v, do, useful, iters, bound_128=sim.block_speedup_bound)
    if "dense" not in PEERS:
      continue
    n = 1
    for x in spatial:
      n *= x
    flat = lambda x: x.reshape(b, n, h, d)
    _perf(name + " (dense, ours)", "mosaic-dense",
          lambda q, k, v: jsa.attention(flat(q), flat(k), flat(v), backend="mosaic_gpu"),
          q, k, v, flat(do), useful, iters)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sections", default="check,perf")
  parser.add_argument("--only", default="dense,window,lm,docs,na2d,na3d")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--impls", default=",".join(IMPLS), help=",".join(OURS))
  parser.add_argument("--peers", default="cudnn,dense", help="cudnn, dense (our dense kernel)")
  parser.add_argument("--head-dim", type=int, default=128, help="perf rows' head_dim")
  parser.add_argument("--segment-maps", default="on", help="on,off: segment ids' block maps")
  parser.add_argument("--check-impl", default="mosaic-bwd", help="the config `check` runs")
  parser.add_argument("--no-check-na", action="store_true", help="check 1-D masks only")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  IMPLS[:] = args.impls.split(",")
  PEERS[:] = args.peers.split(",")
  SEGMENT_MAPS[:] = args.segment_maps.split(",")
  dtype = jnp.dtype(args.dtype)
  sections = args.sections.split(",")
  if "check" in sections:
    section_check(dtype, args.check_impl, not args.no_check_na)
  if "perf" in sections:
    section_perf(dtype, args.iters, args.only.split(","), args.head_dim)
  write_results(args.out, dict(header(args.dtype), head_dim=args.head_dim))


if __name__ == "__main__":
  main()
