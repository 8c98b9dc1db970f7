"""Content-routed attention (MoBA) on the GPU: a real-size gradient check and timings of the
runtime block maps beside our dense causal kernels, in one run.

    python -m benchmarks.bench_routing --sections check,perf --out results.json

check: `attention(..., block_selection=)` on Triton and the Hopper kernels (bf16) against the float32 XLA backend under
the same selection. perf: the MoBA row of ../shared/tools/anchor_probe_sparse.py (S=32768
causal, 128-token blocks, per query block and head the top 32 of random block scores among
the visible blocks, plus its own and the previous block; H=16, D=128, B=1): selection +
runtime-map build on device, forward and forward+backward (the default: the Hopper forward
and the fused Hopper backward; the same with the map built outside the timing, as Flex's
block mask is; the Triton backward; dQ as its own kernel; all-Triton), beside our dense causal kernels
(Triton and Hopper) and the bound (visited fraction of the causal blocks). torch Flex runs
in the probe (same selection rule), in the same device call. video: VMoBA-style routing on a
16x64x64 latent in 2x8x8 blocks beside our static 3-D neighborhood (`--sections video`).
moba: perf's selection timings and its first two rows only. shared: selections shared by
each GQA group (NSA) beside per-head ones, GQA 16/4, with a gradient check.
"""
from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import block_map as block_map_lib
from jax_sparse_attn import masks, ops, routing
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan

from pallas_kernels.gpu import MosaicGPUConfig

from .bench_gpu import (all_finite, fwd_bwd, header, inputs, perf_row, record, rel_errors, timeit,
                        write_results)


def moba_selection(key, b, h, s, bs, top_k):
  """The probe's rule: top `top_k` of uniform random scores among the visible (causal)
  blocks, then the diagonal and the previous block."""
  nb = s // bs
  scores = jax.random.uniform(key, (b, h, nb, nb))
  top = routing.select(scores, bs, top_k, causal=True).ids
  qi = jnp.arange(nb)[:, None]
  local = jnp.broadcast_to(jnp.concatenate([qi, jnp.maximum(qi - 1, 0)], axis=1), (b, h, nb, 2))
  return routing.BlockSelection(jnp.concatenate([top, local], axis=-1).astype(jnp.int32), bs)


def _time_runs(section, name, runs, args, iters):
  """Forward and forward+backward of each (impl, fn) in `runs` on args (q, k, v, do)."""
  for impl, fn in runs:
    perf_row(section, name, impl, fn, args[:3], args[3], iters)


def _record_check(section, case, backend, fn, args, want):
  """Record fn's output and gradients at args (q, k, v, dO) against `want` (relative L2 per
  array) and whether they are finite, or the error."""
  try:
    got = fwd_bwd(fn)(*args)
    record(section=section, case=case, backend=backend,
           **rel_errors(got, want),
           finite=all_finite(got))
  except Exception as e:
    record(section=section, backend=backend, error=repr(e)[:600])
    traceback.print_exc()


def section_check(dtype):
  b, s, h, hkv, d, bs = 1, 4096, 4, 2, 128, 128
  q, k, v, do = inputs((b, s, h, d), (b, s, hkv, d), dtype)
  sel = moba_selection(jax.random.PRNGKey(1), b, h, s, bs, 8)
  ref = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), block_selection=sel,
                                      backend="xla")
  f32 = lambda x: x.astype(jnp.float32)
  want = fwd_bwd(ref)(f32(q), f32(k), f32(v), f32(do))
  variants = [("triton", None), ("mosaic_gpu", None),
              ("mosaic_gpu", MosaicGPUConfig(backward="mosaic_gpu")),
              ("mosaic_gpu", MosaicGPUConfig(backward="mosaic_gpu", backward_dq="kernel"))]
  for backend, config in variants:
    name = backend + ("" if config is None else " (Hopper backward)" if config.backward_dq is None
                      else f" (Hopper backward, dQ {config.backward_dq})")
    ours = lambda q, k, v, be=backend, c=config: jsa.attention(
        q, k, v, masks.causal(), block_selection=sel, backend=be, config=c)
    _record_check("check", f"MoBA causal S={s} top 8 + 2, GQA {h}/{hkv}", name, ours,
                  (q, k, v, do), want)


def section_perf(dtype, iters, short=False):
  b, s, h, d, bs, top_k = 1, 32768, 16, 128, 128, 32
  q, k, v, do = inputs((b, s, h, d), (b, s, h, d), dtype)
  plan = make_plan(masks.causal(), SequenceLayout(s, bs), SequenceLayout(s, bs))
  static = plan.block_map
  sel = jax.jit(lambda key: moba_selection(key, b, h, s, bs, top_k))(jax.random.PRNGKey(0))
  bmap = jax.jit(lambda ids: block_map_lib.from_selection(ids, static))(sel.ids)
  visited = int(jnp.sum(bmap.kv_counts))
  frac = visited / (h * static.num_visited)
  record(section="perf", case="MoBA selection", visited_fraction_of_causal=frac,
         bound_over_causal=1 / frac)
  name = f"MoBA S={s} causal top {top_k} + diagonal + previous, B={b} H={h} D={d}"
  # Selection (MoBA's pooled scores + top-k) and the runtime map, on device.
  build = jax.jit(lambda q, k: block_map_lib.from_selection(
      routing.topk_blocks(q, k, bs, top_k, causal=True, local_blocks=2).ids, static))
  record(section="perf", case=name, impl="ours: pooled scores + top-k + runtime map",
         ms=timeit(build, q, k, iters=iters))
  record(section="perf", case=name, impl="ours: runtime map from a selection",
         ms=timeit(jax.jit(lambda ids: block_map_lib.from_selection(ids, static)), sel.ids,
                   iters=iters))
  scale = d ** -0.5
  runs = [("the default (Hopper forward, fused Hopper backward: dQ reduce-added; runtime map)",
           lambda q, k, v: jsa.attention(q, k, v, masks.causal(), block_selection=sel)),
          # As Flex's row is timed: its block mask is built outside (the map of `sel`, built
          # once above, given to the same kernels).
          ("the default, the runtime map built outside the timing",
           lambda q, k, v: ops.run_plan("mosaic_gpu", plan, scale, None, None, q, k, v,
                                        block_map=bmap)[0]),
          ("mosaic_gpu forward + Triton backward (runtime map)", lambda q, k, v: jsa.attention(
              q, k, v, masks.causal(), block_selection=sel,
              config=MosaicGPUConfig(backward="triton"))),
          ("mosaic_gpu forward + Hopper backward with dQ its own kernel (runtime map)",
           lambda q, k, v: jsa.attention(q, k, v, masks.causal(), block_selection=sel,
                                         config=MosaicGPUConfig(backward="mosaic_gpu",
                                                                backward_dq="kernel"))),
          ("triton (runtime map)", lambda q, k, v: jsa.attention(
              q, k, v, masks.causal(), block_selection=sel, backend="triton")),
          ("triton dense causal", lambda q, k, v: jsa.attention(q, k, v, masks.causal(),
                                                                 backend="triton")),
          ("mosaic_gpu dense causal", lambda q, k, v: jsa.attention(q, k, v, masks.causal(),
                                                                     backend="mosaic_gpu"))]
  if short:  # the default and the same with the map built outside
    runs = runs[:2]
  _time_runs("perf", name, runs, (q, k, v, do), iters)
  if short:
    return
  # Top 1/8 of the blocks each query block can see, plus its own (bound about 8x).
  scores = jax.random.uniform(jax.random.PRNGKey(1), (b, h, s // bs, s // bs))
  sel8 = routing.select(scores, bs, s // bs // 8, causal=True, local_blocks=1,
                        top_fraction=1 / 8)
  bmap8 = block_map_lib.from_selection(sel8.ids, static)
  frac8 = int(jnp.sum(bmap8.kv_counts)) / (h * static.num_visited)
  _time_runs("perf", f"causal S={s}, top 1/8 of each row's visible blocks + its own "
             f"({frac8:.3f} of the causal blocks, bound {1 / frac8:.2f}x)",
             [("mosaic_gpu (runtime map; the default)", lambda q, k, v: jsa.attention(
                 q, k, v, masks.causal(), block_selection=sel8))], (q, k, v, do), iters)


def section_video(dtype, iters):
  """VMoBA-style: a 16x64x64 latent in 2x8x8 blocks (tile order), each block of each head
  attends to its own block and the top 63 of 512 by pooled scores (1/8 of the key blocks),
  beside our static 3-D neighborhood on the same shapes (k 8x16x16: 1/32 of the keys, about
  1/18 of the blocks on its tiles)."""
  b, h, d, spatial, tile = 1, 16, 128, (16, 64, 64), (2, 8, 8)
  shape = (b, *spatial, h, d)
  q, k, v, do = inputs(shape, shape, dtype)
  t = routing.tile_order(spatial, tile)
  name = "video 16x64x64, B=1 H=16 D=128"

  def vmoba(q, k, v):
    qt, kt, vt = t.to_kernel(q), t.to_kernel(k), t.to_kernel(v)
    sel = routing.topk_blocks(qt, kt, 128, 63, local_blocks=1)
    return t.from_kernel(jsa.attention(qt, kt, vt, block_selection=sel))

  runs = [("ours VMoBA (tile order, pooled top-k, runtime map; permutes in and out)", vmoba),
          ("ours static 3-D NA k8x16x16", lambda q, k, v: jsa.na3d(q, k, v, (8, 16, 16)))]
  _time_runs("video", name, runs, (q, k, v, do), iters)


def section_shared(dtype, iters, sizes=(4096, 32768)):
  """NSA-style selections shared by each GQA group (`topk_blocks(..., shared_by_group=True)`:
  one row per KV head) against per-head selections, GQA 16/4: a gradient check at S=4096
  against float32 XLA under the same selection, then MoBA's S=32768 row (top 32 + 2 local of
  256 blocks, pooled scores) with the selection inside the timing."""
  b, h, hkv, d, bs = 1, 16, 4, 128, 128
  q, k, v, do = inputs((b, sizes[0], h, d), (b, sizes[0], hkv, d), dtype)
  f32 = lambda x: x.astype(jnp.float32)
  # The selection from the bf16 inputs for both (float32 pooled scores could pick others).
  sel = routing.topk_blocks(q, k, bs, 8, causal=True, local_blocks=2, shared_by_group=True)
  ref = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), block_selection=sel,
                                      backend="xla")
  want = fwd_bwd(ref)(f32(q), f32(k), f32(v), f32(do))
  _record_check("shared", f"S={sizes[0]} GQA {h}/{hkv} top 8 + 2, shared by group", "auto",
                lambda q, k, v: jsa.attention(q, k, v, masks.causal(), block_selection=sel),
                (q, k, v, do), want)
  s, top_k = sizes[1], 32
  q, k, v, do = inputs((b, s, h, d), (b, s, hkv, d), dtype)
  name = f"MoBA S={s} causal top {top_k} + 2 local, GQA {h}/{hkv} D={d}, selection timed"
  runs = []
  for label, shared in (("per query head", False), ("shared by each GQA group", True)):
    sel_of = lambda q, k, sh=shared: routing.topk_blocks(q, k, bs, top_k, causal=True,
                                                         local_blocks=2, shared_by_group=sh)
    runs.append((f"ours: selection {label}", lambda q, k, v, f=sel_of: jsa.attention(
        q, k, v, masks.causal(), block_selection=f(q, k))))
  _time_runs("shared", name, runs, (q, k, v, do), iters)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sections", default="check,perf")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  head = header(args.dtype)
  record(**head)
  if "check" in args.sections:
    section_check(dtype)
  if "perf" in args.sections or "moba" in args.sections:
    section_perf(dtype, args.iters, short="perf" not in args.sections)
  if "video" in args.sections:
    section_video(dtype, args.iters)
  if "shared" in args.sections:
    section_shared(dtype, args.iters)
  write_results(args.out, head)


if __name__ == "__main__":
  main()
